//! Timeouts and other knobs of the client.

use std::time::Duration;

/// How long each protocol step may take before it fails with
/// [`Error::Timeout`](crate::Error::Timeout), and how often the watcher
/// looks at the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A handler's decision on a proposal or update. The peer that asked
    /// waits [`request`](Self::request) for our answer, so this must leave
    /// room for storing, signing and the reply: see [`Timeouts::check`].
    pub handler: Duration,
    /// How long one request to a peer waits for its reply (the wire's
    /// request timeout, both directions).
    pub request: Duration,
    /// From accepting a proposal to receiving the version-0 signatures.
    pub signing: Duration,
    /// Until every participant's deposit is on-chain.
    pub funding: Duration,
    /// Waiting for a channel's earlier update to finish before a new one
    /// starts; also how long a responder waits for a commit before it asks
    /// the proposer with a `Sync`.
    pub update_wait: Duration,
    /// How often the watcher re-reads a running dispute (to conclude once
    /// its timeout passed).
    pub dispute_poll: Duration,
    /// How often the watcher re-reads the chain for a channel with no
    /// dispute, in case an event was missed (each channel at its own
    /// random offset, so 10,000 channels do not read at once).
    pub chain_recheck: Duration,
    /// The first pause before a failed on-chain step or a failed
    /// subscription is tried again; it doubles with every failure.
    pub retry_min: Duration,
    /// The longest pause between two tries.
    pub retry_max: Duration,
    /// How long `settle` waits for peers to sign the final state before it
    /// closes the channel on-chain alone.
    pub settle_cooperative: Duration,
    /// How long a restored channel keeps trying to reach its peers for `Sync`
    /// before it leaves that to the reconnect resync.
    pub sync: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handler: Duration::from_secs(10),
            request: Duration::from_secs(15),
            signing: Duration::from_secs(30),
            funding: Duration::from_secs(120),
            update_wait: Duration::from_secs(10),
            dispute_poll: Duration::from_secs(1),
            chain_recheck: Duration::from_secs(60),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(30),
            settle_cooperative: Duration::from_secs(15),
            sync: Duration::from_secs(60),
        }
    }
}

/// A relation between [`Timeouts`] that does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutRule {
    /// `request ≥ handler × 3/2`: a peer waits `request` for an answer that
    /// takes up to `handler` to decide, plus half as much again to store,
    /// sign and send. Otherwise the asker gives up on an update the
    /// answerer still signs, and every slow decision burns a version.
    HandlerFitsRequest {
        /// [`Timeouts::handler`].
        handler: Duration,
        /// [`Timeouts::request`].
        request: Duration,
    },
    /// `0 < retry_min ≤ retry_max`.
    Retry {
        /// [`Timeouts::retry_min`].
        min: Duration,
        /// [`Timeouts::retry_max`].
        max: Duration,
    },
    /// This timeout is zero, which would spin or fail at once.
    Zero(&'static str),
}

impl std::fmt::Display for TimeoutRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HandlerFitsRequest { handler, request } => write!(
                f,
                "request ({request:?}) must be at least 3/2 × handler ({handler:?})"
            ),
            Self::Retry { min, max } => {
                write!(f, "need 0 < retry_min ({min:?}) ≤ retry_max ({max:?})")
            }
            Self::Zero(what) => write!(f, "{what} must not be zero"),
        }
    }
}

impl Timeouts {
    /// Checks the relations the protocol relies on; [`ClientBuilder::build`]
    /// refuses timeouts that break one. The one between two peers:
    /// `request ≥ handler × 3/2` ([`TimeoutRule::HandlerFitsRequest`]).
    ///
    /// [`ClientBuilder::build`]: crate::ClientBuilder::build
    ///
    /// ```
    /// use std::time::Duration;
    /// use perun_client::{TimeoutRule, Timeouts};
    ///
    /// assert_eq!(Timeouts::default().check(), Ok(()));
    /// let slow = Timeouts { handler: Duration::from_secs(60), ..Timeouts::default() };
    /// assert!(matches!(slow.check(), Err(TimeoutRule::HandlerFitsRequest { .. })));
    /// ```
    pub fn check(&self) -> Result<(), TimeoutRule> {
        for (what, d) in [
            ("handler", self.handler),
            ("request", self.request),
            ("signing", self.signing),
            ("funding", self.funding),
            ("update_wait", self.update_wait),
            ("dispute_poll", self.dispute_poll),
            ("chain_recheck", self.chain_recheck),
            ("settle_cooperative", self.settle_cooperative),
        ] {
            if d.is_zero() {
                return Err(TimeoutRule::Zero(what));
            }
        }
        if self.request < self.handler.saturating_mul(3) / 2 {
            return Err(TimeoutRule::HandlerFitsRequest {
                handler: self.handler,
                request: self.request,
            });
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(TimeoutRule::Retry {
                min: self.retry_min,
                max: self.retry_max,
            });
        }
        Ok(())
    }

    /// The pause before try `attempt + 1` (1-based `attempt` failures so far):
    /// `retry_min · 2^(attempt-1)`, at most `retry_max`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        self.retry_min
            .saturating_mul(1u32 << shift)
            .min(self.retry_max)
    }
}

/// Caps on what peers can make the client hold (DESIGN §8, "Remote input").
/// Input over a cap is refused (a reject or a `Busy` refusal the sender
/// sees) with a rate-limited `warn!`; nothing else changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Proposals of one peer waiting for our handler's decision or,
    /// accepted, for their version-0 signatures.
    pub proposals_per_peer: usize,
    /// Such proposals of all peers together.
    pub proposals: usize,
    /// Requests of one peer being worked on at once (one task each).
    /// Keep it above the wire's `requests_per_peer`: an honest peer with
    /// the same settings has that many requests in flight to us.
    pub tasks_per_peer: usize,
    /// The transport's caps: connections, unanswered requests, large
    /// frames, the address book.
    pub wire: perun_wire::Limits,
    /// Withdrawn channels kept for readers ([`Client::channel`],
    /// [`Client::channels`]), the oldest leaving first: a long-running
    /// client that opens and settles channels must not keep every one it
    /// ever had. Nothing is at stake in them, and their records already
    /// left the store (a restart knows none).
    ///
    /// [`Client::channel`]: crate::Client::channel
    /// [`Client::channels`]: crate::Client::channels
    pub withdrawn_kept: usize,
}

impl Default for Limits {
    /// 32 pending proposals per peer, 1024 in all, 1024 tasks per peer,
    /// the wire's defaults, and the last 1024 withdrawn channels.
    fn default() -> Self {
        Self {
            proposals_per_peer: 32,
            proposals: 1024,
            tasks_per_peer: 1024,
            wire: perun_wire::Limits::default(),
            withdrawn_kept: 1024,
        }
    }
}
