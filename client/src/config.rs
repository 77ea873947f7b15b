//! Timeouts and other knobs of the client.

use std::time::Duration;

/// How long each protocol step may take before it fails with
/// [`Error::Timeout`](crate::Error::Timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A handler's decision on a proposal or update.
    pub handler: Duration,
    /// From accepting a proposal to receiving the version-0 signatures.
    pub signing: Duration,
    /// Until every participant's deposit is on-chain.
    pub funding: Duration,
    /// Waiting for a channel's earlier update to finish before a new one starts.
    pub update_wait: Duration,
    /// How often the watcher re-reads a running dispute (to conclude once
    /// its timeout passed).
    pub dispute_poll: Duration,
    /// How long `settle` waits for peers to sign the final state before it
    /// closes the channel on-chain alone.
    pub settle_cooperative: Duration,
    /// How long a restored channel keeps trying to reach its peers for `Sync`.
    pub sync: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handler: Duration::from_secs(30),
            signing: Duration::from_secs(30),
            funding: Duration::from_secs(120),
            update_wait: Duration::from_secs(10),
            dispute_poll: Duration::from_secs(1),
            settle_cooperative: Duration::from_secs(15),
            sync: Duration::from_secs(60),
        }
    }
}
