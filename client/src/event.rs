//! What a channel tells its application: chain events, and each step the
//! watcher takes on the channel's behalf, with every retry.

use std::sync::Arc;
use std::time::Duration;

use perun_adjudicator::AdjudicatorEvent;
use perun_channel::{Phase, State};

use crate::Error;

/// One thing that happened to a channel, as [`Channel::events`](crate::Channel::events) reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ChannelEvent {
    /// A chain event about the channel (a registration, the conclusion, a
    /// withdrawal), as the watcher received it. Events are hints: the
    /// watcher acts on a fresh read of the chain.
    Chain(AdjudicatorEvent),
    /// The watcher has read the chain (the channel's history up to `block`,
    /// where the backend reports one) and receives live events from now on:
    /// the channel is protected.
    Watching {
        /// The chain position the history reached, if known.
        block: Option<u64>,
    },
    /// The channel's phase changed.
    Phase(Phase),
    /// In an app channel's dispute, it is our move on the registered state:
    /// answer with [`Channel::force_update`](crate::Channel::force_update)
    /// before the timeout, or the app's rules decide what silence costs.
    YourMove {
        /// The registered state the move follows.
        state: State,
    },
    /// The watcher starts an on-chain step.
    Step(WatcherStep),
    /// An on-chain step succeeded.
    StepDone(WatcherStep),
    /// An on-chain step failed; the watcher tries again after `delay`.
    Retry {
        /// The step that failed.
        step: WatcherStep,
        /// How many times in a row it failed.
        attempt: u32,
        /// The pause before the next try.
        delay: Duration,
        /// Why it failed.
        error: Arc<Error>,
    },
    /// The watcher's event stream ended (a node failure); it subscribes again.
    Resubscribing {
        /// How many times in a row subscribing failed before this one.
        attempt: u32,
        /// Why the stream ended or the subscription failed, if known.
        error: Option<Arc<Error>>,
    },
    /// The watcher panicked (a bug in a backend or here) and was restarted.
    WatcherRestarted {
        /// Why it stopped.
        error: Arc<Error>,
    },
    /// The watcher is done: our funds are withdrawn.
    Withdrawn,
    /// A watchtower's receipt for this version is checked and stored.
    TowerReceipt {
        /// The tower's address.
        tower: perun_channel::Address,
        /// The state version the receipt covers.
        version: u64,
    },
    /// Sending an appointment to a watchtower failed (down, refused, a
    /// wrong signature); it is sent again after `delay`. Updates go on
    /// meanwhile: only this tower's copy lags.
    TowerFailed {
        /// The tower's address.
        tower: perun_channel::Address,
        /// The state version the appointment carried.
        version: u64,
        /// How many times in a row this tower failed for this channel.
        attempt: u32,
        /// The pause before the next try.
        delay: Duration,
        /// Why it failed ([`Error::Tower`], or the store's error).
        error: Arc<Error>,
    },
}

/// An on-chain step the watcher takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatcherStep {
    /// Read the channel's dispute from the chain.
    Read,
    /// Register our latest state, refuting an older registered one.
    Refute {
        /// The registered version.
        registered: u64,
        /// Our latest fully signed version.
        ours: u64,
    },
    /// Register our latest state to close the channel on-chain (a peer
    /// stopped answering, funding failed, or a registration was reorged away).
    Register {
        /// The version registered.
        version: u64,
    },
    /// Conclude the channel: the registered state after its challenge
    /// period, or our final state at once.
    Conclude {
        /// The version concluded.
        version: u64,
    },
    /// Withdraw our share from the asset holders.
    Withdraw,
    /// Progress an app channel's dispute with our move.
    Progress {
        /// The registered version the move follows.
        from: u64,
        /// The move's version.
        version: u64,
    },
}

/// Whether a channel's watcher protects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStatus {
    /// No watcher runs (the channel is not funded yet, or the client stopped).
    Idle,
    /// The watcher runs but has not read the chain yet.
    Starting,
    /// The watcher has read the chain and receives live events.
    Watching,
    /// Our funds are withdrawn; nothing is left to watch.
    Done,
}
