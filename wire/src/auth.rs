//! Peer authentication: is this sender the participant it claims to be?
//!
//! libp2p's noise handshake proves the remote holds the key of its `PeerId`;
//! the proposal binds each participant index to a `PeerId`. Together they
//! let a message about a channel be accepted only from the peer at the index
//! it claims. Funds never rest on this alone: states carry on-chain signatures.

use libp2p::PeerId;
use tracing::warn;

use crate::{Error, Result};

/// Checks that `peer` is the one listed at `index` in a channel's `peers`.
///
/// ```
/// use perun_wire::{authorize, PeerId};
/// let (a, b) = (PeerId::random(), PeerId::random());
/// assert!(authorize(&b, &[a, b], 1).is_ok());
/// assert!(authorize(&b, &[a, b], 0).is_err());
/// ```
pub fn authorize(peer: &PeerId, peers: &[PeerId], index: usize) -> Result<()> {
    match peers.get(index) {
        Some(expected) if expected == peer => Ok(()),
        expected => {
            warn!(%peer, index, ?expected, "peer claims a participant index it does not hold");
            Err(Error::Unauthorized { index, got: *peer })
        }
    }
}
