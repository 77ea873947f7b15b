//! The event scanner one [`EthAdjudicator`](super::EthAdjudicator) (and its
//! clones) shares between all subscriptions: one block subscription, one
//! `eth_getLogs` per scanned range for all channels, logs routed by channel id.
//!
//! # How history and live scanning meet
//! The scanner has scanned every block below `next`, and every *live*
//! subscriber has received its channel's events of exactly those blocks. A
//! new subscriber waits until the next round. A round picks `safe`, the newest
//! block `confirmations` deep, and reads in one go (checked against the same
//! hash of `safe`):
//! - for the live subscribers, the logs of `next..=safe` (address and event
//!   filter only, no channel filter);
//! - for the waiting ones, the logs of `from_block..=safe` of just their
//!   channels (an OR list of channel ids, in chunks).
//!
//! Then everybody has seen `..=safe`, the waiting subscribers turn live and
//! `next` becomes `safe + 1`. Every event is thus delivered once and only when
//! `confirmations` deep, whenever one subscribes. A round that finds the
//! chain changed under it delivers nothing and is retried at the next block.
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
    /// Subscribers that have seen nothing yet; they get their history in the next round.
    waiting: Vec<(ChannelId, EventSender)>,
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
                Ok(()) => {
                    backoff.reset();
                    None
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(%e, ?delay, next = self.next, "scan round failed; retrying from the same block");
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
        }
        if !self.live.is_empty() || !self.waiting.is_empty() {
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
        self.live.values().map(Vec::len).sum::<usize>() + self.waiting.len()
    }

    /// Scans the blocks that became `confirmations` deep for the live
    /// subscribers and the history up to the same block for the waiting ones.
    async fn round(&mut self) -> Result<()> {
        self.rewind_on_reorg().await?;
        let c = &self.c;
        let Some(safe) = c.head().await?.checked_sub(c.cfg.depth()) else {
            return Ok(());
        };
        if safe.saturating_add(1) < self.next {
            // The chain got shorter than what was scanned but kept its blocks:
            // wait until it is as deep again before anyone joins.
            return Ok(());
        }
        let scan_live = !self.live.is_empty() && safe >= self.next;
        if !scan_live && self.waiting.is_empty() {
            return Ok(());
        }
        let Some((_, tip, _)) = c.block(BlockNumberOrTag::Number(safe)).await? else {
            return Ok(()); // The chain got shorter meanwhile: a reorg; next block.
        };
        let fresh = if scan_live {
            let f = self.filter.clone().from_block(self.next).to_block(safe);
            c.conn
                .rpc("eth_getLogs", |p| async move { p.get_logs(&f).await })
                .await?
        } else {
            Vec::new()
        };
        let mut history = Vec::new();
        if !self.waiting.is_empty() && safe >= self.first {
            let mut ids: Vec<B256> = self.waiting.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(HISTORY_IDS) {
                let f = self
                    .filter
                    .clone()
                    .topic1(chunk.to_vec())
                    .from_block(self.first)
                    .to_block(safe);
                history.extend(
                    c.conn
                        .rpc("eth_getLogs", |p| async move { p.get_logs(&f).await })
                        .await?,
                );
            }
        }
        // The logs belong to the chain ending in `tip` only if it is still there.
        if c.block(BlockNumberOrTag::Number(safe))
            .await?
            .map(|(n, h, _)| (n, h))
            != Some((safe, tip))
        {
            warn!(block = safe, "reorg during the scan; scanning again");
            return Ok(());
        }
        debug!(
            from = self.next,
            to = safe,
            live = fresh.len(),
            joining = self.waiting.len(),
            history = history.len(),
            "scanned"
        );
        if safe >= self.next {
            self.next = safe.saturating_add(1);
            self.scanned.push_back((safe, tip));
            if self.scanned.len() > SCAN_MEMORY {
                self.scanned.pop_front();
            }
        }
        for (id, event) in self.events(fresh, safe, tip) {
            for s in self.live.get(&id).into_iter().flatten() {
                s.send(Ok(event.clone()));
            }
        }
        let mut past: HashMap<ChannelId, Vec<AdjudicatorEvent>> = HashMap::new();
        for (id, event) in self.events(history, safe, tip) {
            past.entry(id).or_default().push(event);
        }
        for (id, s) in self.waiting.drain(..) {
            for event in past.get(&id).into_iter().flatten() {
                s.send(Ok(event.clone()));
            }
            s.send(Ok(AdjudicatorEvent::CaughtUp { id, block: safe }));
            self.live.entry(id).or_default().push(s);
        }
        Ok(())
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
