//! The Ethereum side of a [`RegistrationFeed`](crate::RegistrationFeed): one
//! `eth_getLogs` per block range (the adjudicator's address and its two
//! dispute events, no channel filter), so its cost per block does not grow
//! with the number of channels a caller watches.
//!
//! A round reads the head, picks the range `next..=to` (at most `range`
//! blocks, `to` at most the newest block `confirmations` deep), reads the hash
//! of `to`, the logs, and the hash of `to` again: logs of a chain that changed
//! meanwhile are dropped and the range is read again. After a round the
//! range's events and a `Scanned { block: to }` mark are queued. A failed
//! round is retried from the same block after a capped exponential backoff
//! (on a provider rebuilt if the old one died, see `conn`); a failed
//! `eth_getLogs` also halves the range (nodes refuse too large answers), which
//! grows back after successes. Like the channel scanner, the feed remembers
//! the hashes of the last blocks of its ranges and rescans from the fork
//! after a reorg deeper than the confirmation depth.

use std::collections::VecDeque;
use std::time::Duration;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::B256;
use alloy::providers::Provider;
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use tracing::{debug, warn};

use super::conn::{Backoff, Heads};
use super::scan::confirmed_event;
use super::{AdjContract, Chain};
use crate::{Error, FeedItem, Result};

/// The most blocks one `eth_getLogs` of a feed covers by default.
pub(crate) const DEFAULT_RANGE: u64 = 2_000;

/// How many range ends the feed remembers to find where a deep reorg forked off.
const MEMORY: usize = 256;

/// How long the feed waits for a block header before it polls the head.
const POLL: Duration = Duration::from_secs(4);

/// The backoff after a failed round: first and longest wait.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// What the feed waits for before its next round.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Caught up: the next block.
    Head,
    /// A round failed: a pause.
    Sleep(Duration),
}

/// A registration feed over an Ethereum node.
#[derive(Debug)]
pub(crate) struct EthFeed {
    c: Chain,
    filter: Filter,
    heads: Heads,
    backoff: Backoff,
    /// The first block not scanned yet.
    next: u64,
    /// Where the feed started: a reorg below everything remembered rescans from here.
    first: u64,
    /// The most blocks per `eth_getLogs` now (halved after a failed query).
    range: u64,
    /// The most blocks per `eth_getLogs` ever.
    max_range: u64,
    /// The last block of each scanned range with its hash, oldest first.
    scanned: VecDeque<(u64, B256)>,
    /// Items of scanned ranges not handed out yet.
    queue: VecDeque<FeedItem>,
    wait: Option<Wait>,
}

impl EthFeed {
    /// A feed from `from_block` (not before the configured deployment block),
    /// `range` blocks per query at most.
    pub(super) fn new(c: Chain, from_block: u64, range: u64) -> Self {
        let filter = Filter::new()
            .address(c.cfg.adjudicator)
            .event_signature(vec![
                AdjContract::Registered::SIGNATURE_HASH,
                AdjContract::Concluded::SIGNATURE_HASH,
            ]);
        let first = from_block.max(c.cfg.from_block);
        let range = range.max(1);
        Self {
            heads: Heads::new(c.conn.clone(), POLL),
            backoff: Backoff::new(BACKOFF.0, BACKOFF.1),
            c,
            filter,
            next: first,
            first,
            range,
            max_range: range,
            scanned: VecDeque::new(),
            queue: VecDeque::new(),
            wait: None,
        }
    }

    /// See [`RegistrationFeed::next`](crate::RegistrationFeed::next). Every
    /// change of the feed's state happens after the round's last await, so
    /// a cancelled call leaves it as it was.
    pub(crate) async fn next(&mut self) -> FeedItem {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return item;
            }
            match self.wait {
                Some(Wait::Head) => self.heads.next().await,
                Some(Wait::Sleep(d)) => tokio::time::sleep(d).await,
                None => {}
            }
            self.wait = None;
            match self.round().await {
                Ok(caught_up) => {
                    self.backoff.reset();
                    self.wait = caught_up.then_some(Wait::Head);
                }
                Err((error, logs_failed)) => {
                    let delay = self.backoff.next_delay();
                    if logs_failed && self.range > 1 {
                        self.range = (self.range / 2).max(1);
                    }
                    warn!(%error, ?delay, next = self.next, range = self.range, "registration scan failed; retrying from the same block");
                    self.wait = Some(Wait::Sleep(delay));
                    return FeedItem::Retrying { error, delay };
                }
            }
        }
    }

    /// Scans the next range; `true` once the feed has reached the newest
    /// confirmed block. An error says whether `eth_getLogs` itself failed.
    async fn round(&mut self) -> std::result::Result<bool, (Error, bool)> {
        let other = |e| (e, false);
        let c = &self.c;
        let fork = self.fork().await.map_err(other)?;
        let next = fork.unwrap_or(self.next);
        let Some(safe) = c.head().await.map_err(other)?.checked_sub(c.cfg.depth()) else {
            return Ok(true);
        };
        if safe < next {
            self.apply_fork(fork);
            return Ok(true);
        }
        let to = safe.min(next.saturating_add(self.range - 1));
        let Some((_, tip, _)) = c.block(BlockNumberOrTag::Number(to)).await.map_err(other)? else {
            return Ok(true); // The chain got shorter meanwhile: a reorg; next block.
        };
        let f = self.filter.clone().from_block(next).to_block(to);
        let logs = c
            .conn
            .rpc("eth_getLogs", |p| async move { p.get_logs(&f).await })
            .await
            .map_err(|e| (e, true))?;
        // The logs belong to the chain ending in `tip` only if it is still there.
        let now = c.block(BlockNumberOrTag::Number(to)).await.map_err(other)?;
        if now.map(|(n, h, _)| (n, h)) != Some((to, tip)) {
            warn!(
                block = to,
                "reorg during the registration scan; scanning again"
            );
            return Ok(false);
        }
        self.apply_fork(fork);
        let cfg = &self.c.cfg;
        let events = logs.iter().filter_map(|l| {
            let (_, event) = confirmed_event(cfg, l, to, tip)?;
            Some(FeedItem::Event {
                block: l.block_number?,
                event,
            })
        });
        self.queue.extend(events);
        debug!(
            from = next,
            to,
            events = self.queue.len(),
            "registrations scanned"
        );
        self.queue.push_back(FeedItem::Scanned { block: to });
        self.next = to.saturating_add(1);
        self.scanned.push_back((to, tip));
        if self.scanned.len() > MEMORY {
            self.scanned.pop_front();
        }
        if self.range < self.max_range {
            self.range = self.range.saturating_mul(2).min(self.max_range);
        }
        Ok(to == safe)
    }

    /// Where to scan from if a remembered range end was replaced (a reorg
    /// deeper than the confirmation depth): after the newest one still in
    /// the chain. Reads only; [`apply_fork`](Self::apply_fork) acts on it.
    async fn fork(&self) -> Result<Option<u64>> {
        let mut keep = self.scanned.len();
        while let Some(&(number, hash)) = keep.checked_sub(1).and_then(|i| self.scanned.get(i)) {
            let now = self.c.block(BlockNumberOrTag::Number(number)).await?;
            if now.map(|(n, h, _)| (n, h)) == Some((number, hash)) {
                break;
            }
            keep -= 1;
        }
        if keep == self.scanned.len() {
            return Ok(None);
        }
        let from = keep
            .checked_sub(1)
            .and_then(|i| self.scanned.get(i))
            .map_or(self.first, |(n, _)| n.saturating_add(1));
        Ok(Some(from))
    }

    /// Forgets the scanned ranges from `from` on and queues the
    /// [`FeedItem::Reorged`] mark.
    fn apply_fork(&mut self, fork: Option<u64>) {
        let Some(from) = fork else { return };
        self.scanned.retain(|(n, _)| *n < from);
        self.next = from;
        warn!(
            from,
            confirmations = self.c.cfg.depth(),
            "a reorg replaced blocks deeper than the confirmation depth; rescanning registrations"
        );
        self.queue.push_back(FeedItem::Reorged { from });
    }
}
