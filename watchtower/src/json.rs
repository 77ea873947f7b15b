//! The JSON bodies of the tower's API, shared by the server ([`crate::api`],
//! feature `server`) and the HTTP client ([`crate::client`]). Serde only:
//! a client depends on this without the server's dependencies.
//!
//! Byte strings are hex (`0x` optional on input, always present on
//! output); addresses are `0x`-prefixed hex; signatures are 65 bytes
//! `r ‖ s ‖ v`, EIP-191 over the hashes in [`crate::messages`]. Requests
//! refuse unknown fields. The endpoints and error codes are listed in the
//! `api` module's docs.

use alloy_primitives::Address;
use serde::{Deserialize, Serialize};

use crate::scheme::Locator;

/// The error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error's code and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The stable code.
    pub code: String,
    /// What happened.
    pub message: String,
}

/// `POST /register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The user's address.
    pub user: Address,
    /// Its signature over [`crate::messages::register_hash`].
    pub signature: String,
}

/// `POST /add_appointment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddAppointmentRequest {
    /// The locator.
    pub locator: Locator,
    /// Grows with each appointment for this locator (a replay guard).
    pub seq: u64,
    /// The encrypted blob, hex.
    pub blob: String,
    /// The user's signature over [`crate::messages::appointment_hash`].
    pub signature: String,
}

/// `POST /get_appointment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetAppointmentRequest {
    /// The locator.
    pub locator: Locator,
    /// The user's signature over [`crate::messages::get_appointment_hash`].
    pub signature: String,
}

/// `POST /get_subscription_info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetSubscriptionRequest {
    /// The user's address.
    pub user: Address,
    /// Its signature over [`crate::messages::get_subscription_hash`].
    pub signature: String,
}

/// A subscription, signed by the tower.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionResponse {
    /// The user.
    pub user: Address,
    /// Slots in all.
    pub slots_total: u32,
    /// Slots holding an appointment.
    pub slots_used: u32,
    /// Unix time after which no appointment is taken.
    pub expiry: u64,
    /// The tower's signature over [`crate::messages::subscription_hash`].
    pub tower_signature: String,
}

/// A receipt: the tower's signed promise to watch an appointment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptResponse {
    /// The locator.
    pub locator: Locator,
    /// The tower watches from this block on.
    pub start_block: u64,
    /// The user's signature, as sent.
    pub user_signature: String,
    /// The tower's signature over [`crate::messages::receipt_hash`].
    pub tower_signature: String,
}

/// An appointment's status as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppointmentStatus {
    /// Stored, no dispute yet.
    BeingWatched,
    /// A dispute started.
    DisputeTriggered,
    /// The dispute is over.
    Resolved,
    /// The user has no appointment with this locator.
    NotFound,
}

/// `POST /get_appointment`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppointmentResponse {
    /// The locator asked for.
    pub locator: Locator,
    /// Its status.
    pub status: AppointmentStatus,
}
