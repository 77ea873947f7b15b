//! Channel ids, state hashes and nonces.

use alloy_primitives::{B256, U256, keccak256};
use alloy_sol_types::SolValue;

use crate::{Params, State};

/// A channel's id: `keccak256(abi.encode(params))`.
pub type ChannelId = B256;

impl Params {
    /// `keccak256(abi.encode(params))`, as the adjudicator computes it.
    pub fn channel_id(&self) -> ChannelId {
        keccak256(self.abi_encode())
    }
}

impl State {
    /// `keccak256(abi.encode(state))`: what every participant signs (EIP-191 wrapped).
    pub fn hash(&self) -> B256 {
        keccak256(self.abi_encode())
    }
}

/// The channel nonce: `keccak256(share_0 ‖ … ‖ share_{n-1})` over every
/// participant's random 32-byte share, in participant order.
pub fn derive_nonce(shares: &[B256]) -> U256 {
    let mut buf = Vec::with_capacity(shares.len() * 32);
    for s in shares {
        buf.extend_from_slice(s.as_slice());
    }
    U256::from_be_bytes(keccak256(buf).0)
}
