//! The event scanner one [`EthAdjudicator`](super::EthAdjudicator) (and its
//! clones) shares between all subscriptions: one block subscription, one
//! `eth_getLogs` per scanned range for all channels, logs routed by channel id.
//!
//! # How history and live scanning meet
//! The scanner has scanned every block below `next`, and every *live*
//! subscriber has received its channel's events of exactly those blocks.
//! New subscribers wait; the oldest waiting ones become the *joining* group,
//! which reads its history from `from_block` on, one range per round. A
//! round picks `safe`, the newest block `confirmations` deep, and `end`, the
//! last block the round takes the live subscribers to (at most `range`
//! blocks past `next`), and reads in one go (checked against the same hash
//! of `end`):
//! - for the live subscribers, the logs of `next..=end` (address and event
//!   filter only, no channel filter);
//! - for the joining group, the logs of its next range, at most `range`
//!   blocks and at most up to `end`, of just its channels (an OR list of
//!   channel ids, in chunks).
//!
//! The live subscribers have then seen `..=end`; a joining group whose
//! history reached `end` gets `CaughtUp { block: end }` and turns live, and
//! `next` becomes `end + 1`. Every event is thus delivered once and only
//! when `confirmations` deep, whenever one subscribes. A round that finds
//! the chain changed under it delivers nothing and is retried at the next
//! block.
//!
//! No query spans more than `range` blocks: nodes refuse wide `eth_getLogs`
//! (hosted ones at 1,000 to 10,000 blocks), and one subscriber's history
//! from an old deployment block must not stop the live events of every
//! other. A failed round halves `range`; successes grow it back (as the
//! registration feed does). A scanner that is behind, or a group still
//! joining, starts its next round at once.
//!
//! # Reorgs
//! The scanner remembers the hash of the last block of each scanned range; if
//! one was replaced (a reorg deeper than the confirmation depth), `next` goes
//! back to the newest remembered block still in the chain and the live
//! subscribers get the events after it again.
//!
//! # Faults
//! Nothing the node does ends the streams. A failed round (an `eth_getLogs`
//! that failed or timed out, a lost connection) is logged and retried after a
//! capped exponential backoff from the same cursor, so no event is lost and
//! none is delivered twice; a closed block subscription is re-opened (on a
//! rebuilt provider, see `conn`), and when no header comes for a while the
//! scanner polls the head instead.
//!
//! # Lifetime
//! The task starts with the first subscription and stops once no stream is
//! left (the last dropped stream wakes it), or when the adjudicator (every
//! clone) is dropped, which ends every stream. A later subscription starts a
//! new task.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::B256;
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log};
use alloy::sol_types::SolEvent;
use perun_channel::{ChannelId, State};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::conn::{Backoff, Heads};
use super::{AdjContract, Chain, EthConfig, Holder};
use crate::types::{EventSender, OpenStreams};
use crate::{AdjudicatorEvent, BadEventReason, Error, Result};

/// How many scanned block hashes the scanner keeps to find where a reorg
/// deeper than the confirmation depth forked off.
const SCAN_MEMORY: usize = 256;

/// How many channel ids one history query filters on (an OR list on topic 1).
const HISTORY_IDS: usize = 1_000;

/// How long the scanner waits for a block header before it polls the head.
const POLL: Duration = Duration::from_secs(4);

/// The backoff after a failed round: first and longest wait.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// What the adjudicator handles and the scanner task share.
#[derive(Debug)]
pub(super) struct Hub {
    state: Mutex<HubState>,
    /// The open streams; wakes the task on a subscription and when none is left.
    pub(super) streams: Arc<OpenStreams>,
    /// Whether a scanner task runs (for observers; the truth is in `state`).
    pub(super) running: watch::Sender<bool>,
    /// Set when the adjudicator is dropped: the task ends every stream and stops.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct HubState {
    /// Whether a task runs that will pick up `waiting`.
    running: bool,
    /// Counts started tasks, so a finished task does not report on its successor.
    generation: u64,
    /// New subscribers, not handed to the task yet.
    waiting: Vec<(ChannelId, EventSender)>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            streams: Arc::default(),
            running: watch::Sender::new(false),
            closed: AtomicBool::new(false),
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Every update of the state is a single step; a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a subscriber; returns the generation of the task to start if none runs.
    pub(super) fn join(&self, id: ChannelId, tx: EventSender) -> Option<u64> {
        let mut st = self.lock();
        st.waiting.push((id, tx));
        self.streams.opened();
        if st.running {
            return None;
        }
        st.running = true;
        st.generation += 1;
        self.running.send_replace(true);
        Some(st.generation)
    }
}

/// Owned by the adjudicator (shared by its clones): dropping the last one
/// ends the scanner and every stream.
#[derive(Debug)]
pub(super) struct Closer {
    hub: Arc<Hub>,
}

impl Closer {
    pub(super) fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.hub.closed.store(true, Ordering::Release);
        self.hub.streams.changed.notify_one();
    }
}

/// Starts the scanner task of `generation`.
pub(super) fn spawn(c: Chain, hub: Arc<Hub>, generation: u64) {
    let span = info_span!("eth_events", adjudicator = %c.cfg.adjudicator);
    // Deposits share the holders' address but are no channel events: leave them out.
    let filter = super::deployment_filter(
        &c.cfg,
        vec![
            AdjContract::Registered::SIGNATURE_HASH,
            AdjContract::Progressed::SIGNATURE_HASH,
            AdjContract::Concluded::SIGNATURE_HASH,
            Holder::Withdrawn::SIGNATURE_HASH,
        ],
    );
    let scanner = Scanner {
        next: c.cfg.from_block,
        first: c.cfg.from_block,
        scanned: VecDeque::new(),
        live: HashMap::new(),
        waiting: Vec::new(),
        joining: Vec::new(),
        joined_to: c.cfg.from_block,
        range: c.cfg.log_range.max(1),
        filter,
        _stopped: Stopped {
            hub: hub.clone(),
            generation,
        },
        c,
        hub,
    };
    tokio::spawn(scanner.run().instrument(span));
}

/// Marks the task of `generation` stopped however it ends (return, panic,
/// runtime shutdown), unless a newer one was started meanwhile.
#[derive(Debug)]
struct Stopped {
    hub: Arc<Hub>,
    generation: u64,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("event scanner panicked; its streams end (subscribe again)");
        }
        let mut st = self.hub.lock();
        if st.generation == self.generation {
            st.running = false;
            self.hub.running.send_replace(false);
        }
    }
}

/// The scanner task's state.
#[derive(Debug)]
struct Scanner {
    c: Chain,
    hub: Arc<Hub>,
    /// The contracts and the channel events (not deposits); no channel filter.
    filter: Filter,
    /// The first block not scanned yet: live subscribers have seen everything below.
    next: u64,
    /// `from_block`: where history starts, and where a reorg below everything remembered rescans from.
    first: u64,
    /// The last block of each scanned range with its hash, oldest first.
    scanned: VecDeque<(u64, B256)>,
    /// Subscribers that have seen every event below `next`, by channel.
    live: HashMap<ChannelId, Vec<EventSender>>,
    /// Subscribers that have seen nothing yet; they join once the group
    /// joining now has.
    waiting: Vec<(ChannelId, EventSender)>,
    /// Subscribers reading their history, a range per round.
    joining: Vec<(ChannelId, EventSender)>,
    /// The first block the joining group has not read yet.
    joined_to: u64,
    /// The most blocks one `eth_getLogs` covers now (halved after a failed
    /// round, grown back after successes, at most `EthConfig::log_range`).
    range: u64,
    _stopped: Stopped,
}

impl Scanner {
    async fn run(mut self) {
        let mut heads = Heads::new(self.c.conn.clone(), POLL);
        let mut backoff = Backoff::new(BACKOFF.0, BACKOFF.1);
        debug!("event scanner started");
        loop {
            if !self.collect() {
                debug!("no subscriber left; event scanner stops");
                return;
            }
            heads.ensure().await;
            let wait = match self.round().await {
                Ok(caught_up) => {
                    backoff.reset();
                    (!caught_up).then_some(Duration::ZERO)
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    self.range = (self.range / 2).max(1);
                    warn!(%e, ?delay, next = self.next, range = self.range, "scan round failed; retrying from the same block");
                    Some(delay)
                }
            };
            let changed = self.hub.streams.changed.notified();
            match wait {
                Some(delay) => tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = changed => {}
                },
                None => tokio::select! {
                    () = heads.recv() => {}
                    () = changed => {}
                },
            }
        }
    }

    /// Takes the new subscribers and forgets dropped ones; `false` (and the
    /// task counts as stopped) once nobody is left or the adjudicator is gone.
    fn collect(&mut self) -> bool {
        if self.hub.closed.load(Ordering::Acquire) {
            let mut st = self.hub.lock();
            st.running = false;
            // Dropping the senders ends the streams.
            st.waiting.clear();
            drop(st);
            self.live.clear();
            self.waiting.clear();
            self.joining.clear();
            info!("adjudicator dropped; event streams end");
            return false;
        }
        self.waiting.append(&mut self.hub.lock().waiting);
        if self.hub.streams.open() < self.subscribers() {
            self.live.retain(|_, subs| {
                subs.retain(|s| !s.is_closed());
                !subs.is_empty()
            });
            self.waiting.retain(|(_, s)| !s.is_closed());
            self.joining.retain(|(_, s)| !s.is_closed());
        }
        if !self.live.is_empty() || !self.waiting.is_empty() || !self.joining.is_empty() {
            return true;
        }
        let mut st = self.hub.lock();
        if st.waiting.is_empty() {
            // Decided under the lock: a subscriber joining after this starts a new task.
            st.running = false;
            return false;
        }
        self.waiting.append(&mut st.waiting);
        true
    }

    fn subscribers(&self) -> usize {
        self.live.values().map(Vec::len).sum::<usize>() + self.waiting.len() + self.joining.len()
    }

    /// Scans up to `range` blocks that became `confirmations` deep for the
    /// live subscribers and the next range of the joining group's history,
    /// up to the same block. `true` once everybody has seen every confirmed
    /// block (the next round may wait for a new one).
    async fn round(&mut self) -> Result<bool> {
        self.rewind_on_reorg().await?;
        let c = &self.c;
        let Some(safe) = c.head().await?.checked_sub(c.cfg.depth()) else {
            return Ok(true);
        };
        if safe.saturating_add(1) < self.next {
            // The chain got shorter than what was scanned but kept its blocks:
            // wait until it is as deep again before anyone joins.
            return Ok(true);
        }
        if self.joining.is_empty() && !self.waiting.is_empty() {
            self.joining = std::mem::take(&mut self.waiting);
            self.joined_to = self.first;
        }
        let span = self.range.max(1) - 1;
        // Where everybody stands after this round: the live subscribers
        // move on by a range at most; without any, the cursor follows `safe`.
        let scan_live = !self.live.is_empty() && safe >= self.next;
        let end = if scan_live {
            safe.min(self.next.saturating_add(span))
        } else if self.live.is_empty() {
            safe
        } else {
            self.next.saturating_sub(1)
        };
        let history_to = (!self.joining.is_empty() && end >= self.joined_to)
            .then(|| end.min(self.joined_to.saturating_add(span)));
        if !scan_live && history_to.is_none() && self.joining.is_empty() {
            return Ok(true);
        }
        let Some((_, tip, _)) = c.block(BlockNumberOrTag::Number(end)).await? else {
            return Ok(true); // The chain got shorter meanwhile: a reorg; next block.
        };
        let fresh = if scan_live {
            let f = self.filter.clone().from_block(self.next).to_block(end);
            c.conn
                .rpc("eth_getLogs", |p| async move { p.get_logs(&f).await })
                .await?
        } else {
            Vec::new()
        };
        let mut history = Vec::new();
        if let Some(to) = history_to {
            let mut ids: Vec<B256> = self.joining.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(HISTORY_IDS) {
                let f = self
                    .filter
                    .clone()
                    .topic1(chunk.to_vec())
                    .from_block(self.joined_to)
                    .to_block(to);
                history.extend(
                    c.conn
                        .rpc("eth_getLogs", |p| async move { p.get_logs(&f).await })
                        .await?,
                );
            }
        }
        // The logs belong to the chain ending in `tip` only if it is still there.
        if c.block(BlockNumberOrTag::Number(end))
            .await?
            .map(|(n, h, _)| (n, h))
            != Some((end, tip))
        {
            warn!(block = end, "reorg during the scan; scanning again");
            return Ok(true);
        }
        debug!(
            from = self.next,
            to = end,
            live = fresh.len(),
            joining = self.joining.len(),
            history_from = self.joined_to,
            history_to = ?history_to,
            history = history.len(),
            "scanned"
        );
        if end >= self.next {
            self.next = end.saturating_add(1);
            self.scanned.push_back((end, tip));
            if self.scanned.len() > SCAN_MEMORY {
                self.scanned.pop_front();
            }
        }
        for (id, event) in self.events(fresh, end, tip) {
            for s in self.live.get(&id).into_iter().flatten() {
                s.send(Ok(event.clone()));
            }
        }
        let mut past: HashMap<ChannelId, Vec<AdjudicatorEvent>> = HashMap::new();
        for (id, event) in self.events(history, end, tip) {
            past.entry(id).or_default().push(event);
        }
        for (id, s) in &self.joining {
            for event in past.get(id).into_iter().flatten() {
                s.send(Ok(event.clone()));
            }
        }
        // History read up to `end` (or none below it: a deployment block
        // above `safe`): the group turns live.
        if history_to.is_none_or(|to| to == end) {
            for (id, s) in self.joining.drain(..) {
                s.send(Ok(AdjudicatorEvent::CaughtUp { id, block: end }));
                self.live.entry(id).or_default().push(s);
            }
        } else if let Some(to) = history_to {
            self.joined_to = to.saturating_add(1);
        }
        self.range = self
            .range
            .saturating_mul(2)
            .min(self.c.cfg.log_range.max(1));
        Ok(end == safe && self.joining.is_empty() && self.waiting.is_empty())
    }

    /// The channel events of `logs` (in chain order) on the chain ending in
    /// `tip` at `safe`, with their channel; anything else is skipped with a warning.
    fn events(&self, logs: Vec<Log>, safe: u64, tip: B256) -> Vec<(ChannelId, AdjudicatorEvent)> {
        logs.into_iter()
            .filter_map(|l| confirmed_event(&self.c.cfg, &l, safe, tip))
            .collect()
    }

    /// If a block already scanned was replaced (a reorg deeper than the
    /// confirmation depth), scans again from the newest scanned block that is
    /// still in the chain. Events after it may be delivered a second time.
    async fn rewind_on_reorg(&mut self) -> Result<()> {
        let mut rewound = false;
        while let Some(&(number, hash)) = self.scanned.back() {
            let now = self.c.block(BlockNumberOrTag::Number(number)).await?;
            if now.map(|(n, h, _)| (n, h)) == Some((number, hash)) {
                break;
            }
            self.scanned.pop_back();
            rewound = true;
        }
        if rewound {
            self.next = self
                .scanned
                .back()
                .map_or(self.first, |(n, _)| n.saturating_add(1));
            // History read past the fork is read again (its events may come twice).
            self.joined_to = self.joined_to.min(self.next);
            warn!(
                from = self.next,
                confirmations = self.c.cfg.depth(),
                "a reorg replaced blocks deeper than the confirmation depth; rescanning"
            );
        }
        Ok(())
    }
}

/// The channel event of a log of the chain ending in `tip` at `safe`, with its
/// channel; `None` (with a warning) for a log not in that chain, without a
/// channel id or that does not decode.
pub(super) fn confirmed_event(
    cfg: &EthConfig,
    l: &Log,
    safe: u64,
    tip: B256,
) -> Option<(ChannelId, AdjudicatorEvent)> {
    // Removed, unplaced, or from another chain than the one just checked.
    let stale = l.removed
        || l.block_number.is_none_or(|n| n > safe)
        || (l.block_number == Some(safe) && l.block_hash != Some(tip));
    if stale {
        warn!(block = ?l.block_number, "skipping a log not in the confirmed chain");
        return None;
    }
    let Some(&id) = l.topics().get(1) else {
        warn!(address = %l.address(), "skipping a log without a channel id");
        return None;
    };
    match decode_event(cfg, id, l) {
        Ok(e) => Some((id, e)),
        Err(e) => {
            warn!(%e, "skipping undecodable event");
            None
        }
    }
}

/// Decodes one of the channel's logs; anything else is an error the stream skips.
fn decode_event(cfg: &EthConfig, id: ChannelId, log: &Log) -> Result<AdjudicatorEvent> {
    let topic0 = log.topic0().copied().unwrap_or_default();
    let bad = |e: alloy::sol_types::Error| Error::BadEvent {
        address: log.address(),
        topic: topic0,
        reason: BadEventReason::Decode(e.to_string()),
    };
    // A registered or progressed state must be of the channel it names,
    // and that of the channel asked about.
    let ours = |named: ChannelId, state: &State| {
        if named != id || state.channelId != id {
            return Err(Error::BadEvent {
                address: log.address(),
                topic: topic0,
                reason: BadEventReason::OtherChannel(named),
            });
        }
        Ok(())
    };
    let event = if log.address() == cfg.adjudicator
        && topic0 == AdjContract::Registered::SIGNATURE_HASH
    {
        let e = AdjContract::Registered::decode_log(&log.inner)
            .map_err(bad)?
            .data;
        let state: State = e.state.into();
        ours(e.channelId, &state)?;
        AdjudicatorEvent::Registered {
            id,
            version: e.version,
            timeout: e.timeout,
            nonce: e.nonce,
            state,
        }
    } else if log.address() == cfg.adjudicator && topic0 == AdjContract::Progressed::SIGNATURE_HASH
    {
        let e = AdjContract::Progressed::decode_log(&log.inner)
            .map_err(bad)?
            .data;
        let state: State = e.state.into();
        ours(e.channelId, &state)?;
        // The contract checks `actor < participants`; anything else is not its log.
        let actor = usize::try_from(e.actor).map_err(|_| Error::BadEvent {
            address: log.address(),
            topic: topic0,
            reason: BadEventReason::Decode(format!("actor {} out of range", e.actor)),
        })?;
        AdjudicatorEvent::Progressed {
            id,
            version: e.version,
            timeout: e.timeout,
            actor,
            state,
        }
    } else if log.address() == cfg.adjudicator && topic0 == AdjContract::Concluded::SIGNATURE_HASH {
        let e = AdjContract::Concluded::decode_log(&log.inner)
            .map_err(bad)?
            .data;
        AdjudicatorEvent::Concluded {
            id: e.channelId,
            version: e.version,
        }
    } else if cfg.assets.contains_key(&log.address()) && topic0 == Holder::Withdrawn::SIGNATURE_HASH
    {
        let e = Holder::Withdrawn::decode_log(&log.inner).map_err(bad)?.data;
        AdjudicatorEvent::Withdrawn {
            id: e.channelId,
            holder: log.address(),
            participant: e.participant,
            receiver: e.receiver,
            amount: e.amount,
        }
    } else {
        return Err(Error::BadEvent {
            address: log.address(),
            topic: topic0,
            reason: BadEventReason::Unexpected,
        });
    };
    Ok(event)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use alloy::primitives::{Address, Bytes, LogData, U256};

    use super::*;
    use crate::AssetKind;

    const ADJ: Address = Address::repeat_byte(0xad);

    fn cfg() -> EthConfig {
        EthConfig::new(ADJ, 0, [(Address::repeat_byte(0xee), AssetKind::Eth)])
    }

    fn log(data: LogData) -> Log {
        Log {
            inner: alloy::primitives::Log { address: ADJ, data },
            block_hash: Some(B256::repeat_byte(7)),
            block_number: Some(5),
            block_timestamp: None,
            transaction_hash: None,
            transaction_index: None,
            log_index: Some(0),
            removed: false,
        }
    }

    fn progressed(channel: B256, state_channel: B256) -> LogData {
        let state = State {
            channelId: state_channel,
            version: 2,
            outcome: perun_channel::Allocation::new(
                vec![perun_channel::Asset {
                    chainId: U256::from(1),
                    holder: Address::repeat_byte(0xee),
                }],
                vec![vec![U256::from(3), U256::ZERO]],
            ),
            appData: Bytes::from(vec![0u8; 10]),
            isFinal: false,
        };
        AdjContract::Progressed {
            channelId: channel,
            version: 2,
            timeout: 99,
            actor: 1,
            state: (&state).into(),
        }
        .encode_log_data()
    }

    /// A `Progressed` log decodes into the event; one naming another channel (in its topic
    /// or its state) or whose data does not decode is a typed `BadEvent`, never a panic.
    #[test]
    fn progressed_logs_decode_and_bad_ones_are_refused() {
        let (id, other) = (B256::repeat_byte(1), B256::repeat_byte(2));
        match decode_event(&cfg(), id, &log(progressed(id, id))).unwrap() {
            AdjudicatorEvent::Progressed {
                id: got,
                version: 2,
                timeout: 99,
                actor: 1,
                state,
            } => assert_eq!((got, state.channelId), (id, id)),
            e => panic!("{e:?}"),
        }
        for bad in [progressed(id, other), progressed(other, other)] {
            assert!(matches!(
                decode_event(&cfg(), id, &log(bad)),
                Err(Error::BadEvent {
                    reason: BadEventReason::OtherChannel(_),
                    ..
                })
            ));
        }
        let mut garbage = progressed(id, id);
        garbage = LogData::new_unchecked(garbage.topics().to_vec(), Bytes::from(vec![0xff; 40]));
        assert!(matches!(
            decode_event(&cfg(), id, &log(garbage)),
            Err(Error::BadEvent {
                reason: BadEventReason::Decode(_),
                ..
            })
        ));
    }
}
