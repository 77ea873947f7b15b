//! [`RegistrationFeed`]: every dispute on an adjudicator, in chain order, from
//! a cursor the caller keeps.
//!
//! A channel's [`EventStream`](crate::EventStream) serves a party that knows
//! its channels. A watchtower does not: it must see every `Registered` (and
//! `Concluded`) event of the adjudicator, whichever channel it is about,
//! derive a locator from each (channel id and `params.nonce`) and look it up.
//! The feed gives it exactly that, at the confirmation depth, with the block
//! of each event and a [`FeedItem::Scanned`] mark after each scanned range:
//! the caller processes the events, stores the mark's block as its cursor,
//! and after a restart asks for a feed from `cursor + 1`. Nothing is lost
//! between the two runs, and an event comes at most twice (a crash after
//! processing an event but before the mark was stored).
//!
//! Made by [`EthAdjudicator::registrations`](crate::EthAdjudicator::registrations)
//! and [`SimLedger::registrations`](crate::SimLedger::registrations).

use std::time::Duration;

use crate::{AdjudicatorEvent, Error};

/// One item of a [`RegistrationFeed`].
#[derive(Debug)]
pub enum FeedItem {
    /// A [`Registered`](AdjudicatorEvent::Registered) or
    /// [`Concluded`](AdjudicatorEvent::Concluded) event of some channel,
    /// mined in block `block` (on [`SimLedger`](crate::SimLedger): the
    /// ledger's event count after it).
    Event {
        /// The block the event was mined in.
        block: u64,
        /// The event.
        event: AdjudicatorEvent,
    },
    /// Every event up to and including block `block` has been delivered: the
    /// cursor to store once they are processed (restart from `block + 1`).
    Scanned {
        /// The last block scanned.
        block: u64,
    },
    /// A reorg deeper than the confirmation depth replaced blocks delivered
    /// already: the feed scans again from block `from`, so events of those
    /// blocks that are still in the chain come again (events are hints; the
    /// dispute read from the contract is the truth).
    Reorged {
        /// The first block scanned again.
        from: u64,
    },
    /// A scan failed (the node did not answer, a connection was lost); the
    /// feed tries the same blocks again after `delay`, and keeps doing so.
    /// For the caller's health reports only: nothing is lost.
    Retrying {
        /// What failed.
        error: Error,
        /// How long the feed waits before the next attempt.
        delay: Duration,
    },
}

/// Every `Registered` and `Concluded` event of one adjudicator in chain order,
/// from a block on; it never ends (node failures are retried, see
/// [`FeedItem::Retrying`]). Pull it with [`next`](Self::next).
#[derive(Debug)]
pub struct RegistrationFeed {
    source: Source,
}

#[derive(Debug)]
enum Source {
    Eth(Box<crate::eth::feed::EthFeed>),
    Sim(crate::sim::SimFeed),
}

impl RegistrationFeed {
    pub(crate) fn eth(feed: crate::eth::feed::EthFeed) -> Self {
        Self {
            source: Source::Eth(Box::new(feed)),
        }
    }

    pub(crate) fn sim(feed: crate::sim::SimFeed) -> Self {
        Self {
            source: Source::Sim(feed),
        }
    }

    /// The next item; waits for new blocks once the feed has caught up.
    /// Cancel-safe: a cancelled call loses no item (the range being scanned
    /// is scanned again).
    pub async fn next(&mut self) -> FeedItem {
        match &mut self.source {
            Source::Eth(f) => f.next().await,
            Source::Sim(f) => f.next().await,
        }
    }
}
