//! The chain index: which channels this account took part in and what the
//! chain still owes it, rebuilt from the contracts' logs; and
//! [`ChainIndex::recover_funds`], which withdraws every such credit. A user
//! who lost the local store gets back what the chain owes it.
//!
//! # Scan
//! The index reads the deployment's channel logs ([`ChainHistory`]) from
//! the deployment block up to the newest confirmed block, in ranges of at
//! most [`IndexConfig::range`] blocks (one `eth_getLogs` each), and keeps
//! what concerns this account in the store's metadata slot
//! ([`ChainIndexRecord`]): the holders' logs that name it as participant
//! (`Deposited`, `Paid`, `Credited`, `Withdrawn`), and the adjudicator's
//! logs (`Registered`, `Concluded`) of the channels those logs name. With
//! them it stores its cursor, the last block read, so the next scan starts
//! where this one ended.
//!
//! # Reorgs
//! Each scan starts [`IndexConfig::reread`] blocks before the cursor's next
//! block (not before the deployment block), drops the facts it had from
//! those blocks and reads them again: a reorg of up to that depth (beyond
//! the backend's confirmation depth) replaces what it changed, and nothing
//! is counted twice. Within a scan every fact is keyed by its position
//! (block, log index); a log whose position was seen already is refused.
//!
//! # Trust
//! Every log is untrusted: one that does not decode or cannot be placed is
//! refused (typed, `warn!`, counted in [`ScanReport::rejected`]), never a
//! panic. Zero deposits are ignored (a stranger could otherwise grow the
//! record for free). Logs only say where to look: every (channel, holder)
//! slot that a deposit or credit naming this account may have left
//! non-empty (no `Paid` to it since) is read with the holder's `holdings`
//! at every scan, and a credit is reported and withdrawn only as that read
//! says (concluded, non-zero), whether or not the conclusion's log was
//! seen. A read that fails is listed in [`ChainView::unread`]; the others
//! are answered all the same.
//!
//! # Limits
//! `Registered` and `Concluded` do not name the participants: a channel's
//! registrations and conclusion that came before any holder log naming
//! this account, in an earlier scan range, are not listed in
//! [`ChainChannel`] (its credits are still found: they are read). Every
//! open channel of the account costs one `holdings` read per scan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use perun_adjudicator::{Adjudicator, ChainFact, ChainHistory, ChainLog};
use perun_channel::{Address, ChannelId, U256};
use perun_persistence::{ChainIndexRecord, FactKind, IndexedFact, Persister};
use perun_wallet::Account;
use tracing::{debug, info, warn};

use crate::{Error, Result};

/// Credit reads in flight at once.
const CREDIT_READS: usize = 16;

/// How often a long scan stores its progress (and once at its end).
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// How the index scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// How many blocks before the cursor each scan reads again, to survive a
    /// reorg deeper than the backend's confirmation depth. Default 64.
    pub reread: u64,
    /// The most blocks one log query covers. Default 2,000 (what public
    /// nodes commonly allow).
    pub range: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            reread: 64,
            range: 2_000,
        }
    }
}

/// What one scan read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// The first block read (the cursor's next block less
    /// [`IndexConfig::reread`]).
    pub from: u64,
    /// The last block read: the new cursor.
    pub to: u64,
    /// How many blocks were read (0: nothing new is confirmed).
    pub blocks_read: u64,
    /// How many log queries it took.
    pub queries: u64,
    /// Facts found in the blocks read (re-read ones included).
    pub facts: usize,
    /// Facts of the re-read blocks dropped before reading them again.
    pub dropped: usize,
    /// Logs refused as untrusted input (each logged with `warn!`).
    pub rejected: usize,
}

/// An amount at a holder, in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainAmount {
    /// The asset holder.
    pub holder: Address,
    /// The amount.
    pub amount: U256,
    /// The block of the log.
    pub block: u64,
}

/// One of this account's channels as the chain shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainChannel {
    /// The channel.
    pub id: ChannelId,
    /// What arrived for this account (`Deposited`).
    pub deposits: Vec<ChainAmount>,
    /// Registrations as `(version, block)`.
    pub registrations: Vec<(u64, u64)>,
    /// The concluded version and its block, once concluded.
    pub concluded: Option<(u64, u64)>,
    /// What the outcome pushed to this account (`Paid`).
    pub paid: Vec<ChainAmount>,
    /// What the outcome credited to it (`Credited`: the push failed).
    pub credited: Vec<ChainAmount>,
    /// What was withdrawn of its credits (`Withdrawn`).
    pub withdrawn: Vec<ChainAmount>,
}

/// A credit this account can withdraw now, as the holder reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The channel.
    pub channel: ChannelId,
    /// The asset holder.
    pub holder: Address,
    /// The withdrawable amount.
    pub amount: U256,
}

/// A slot whose credit could not be read (the node failed): scan again.
#[derive(Debug, Clone)]
pub struct Unread {
    /// The channel.
    pub channel: ChannelId,
    /// The asset holder.
    pub holder: Address,
    /// Why the read failed.
    pub error: Arc<Error>,
}

/// The index's answer.
#[derive(Debug, Clone, Default)]
pub struct ChainView {
    /// Every channel this account took part in that appeared on-chain, by id.
    pub channels: Vec<ChainChannel>,
    /// Every credit withdrawable by this account now.
    pub credits: Vec<Credit>,
    /// Slots that may hold a credit but could not be read this time; the
    /// other credits are answered (and recovered) all the same.
    pub unread: Vec<Unread>,
    /// What the scan before the answer read.
    pub scan: ScanReport,
}

/// What [`ChainIndex::recover_funds`] did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The credits withdrawn (to this account), with the amounts paid.
    pub withdrawn: Vec<Credit>,
    /// The credits whose withdrawal failed, with why (a receiver that
    /// refuses the asset, the node): call again later.
    pub failed: Vec<(Credit, Error)>,
    /// Slots whose credit could not be read: call again later.
    pub unread: Vec<Unread>,
    /// What the scan before the withdrawals read.
    pub scan: ScanReport,
}

impl Recovered {
    /// The total withdrawn at `holder`.
    pub fn total(&self, holder: Address) -> U256 {
        self.withdrawn
            .iter()
            .filter(|c| c.holder == holder)
            .fold(U256::ZERO, |s, c| s.saturating_add(c.amount))
    }
}

/// One lock per index record in the process: two scans of the same record
/// would each store what they read over the other's.
static LOCKS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Mutex::default);

/// An account's chain index on one deployment, kept in a store. Cheap to
/// make; every scan starts from the stored cursor.
pub struct ChainIndex {
    adjudicator: Arc<dyn Adjudicator>,
    store: Arc<dyn Persister>,
    account: Arc<dyn Account>,
    config: IndexConfig,
    key: String,
}

impl std::fmt::Debug for ChainIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainIndex")
            .field("key", &self.key)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ChainIndex {
    /// The index of `account` on `adjudicator`'s deployment, stored in
    /// `store`. Fails with [`Error::NoChainHistory`] if the backend cannot
    /// read the chain's history.
    pub fn new(
        adjudicator: Arc<dyn Adjudicator>,
        store: Arc<dyn Persister>,
        account: Arc<dyn Account>,
        config: IndexConfig,
    ) -> Result<Self> {
        if adjudicator.history().is_none() {
            return Err(Error::NoChainHistory);
        }
        let domain = adjudicator.domain();
        let key = ChainIndexRecord::key(domain.chain_id, domain.adjudicator, account.address());
        Ok(Self {
            adjudicator,
            store,
            account,
            config: IndexConfig {
                reread: config.reread,
                range: config.range.max(1),
            },
            key,
        })
    }

    fn history(&self) -> Result<&dyn ChainHistory> {
        self.adjudicator.history().ok_or(Error::NoChainHistory)
    }

    fn lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        LOCKS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(self.key.clone())
            .or_default()
            .clone()
    }

    /// The stored record (empty before the first scan).
    async fn load(&self) -> Result<ChainIndexRecord> {
        match self.store.meta_get(&self.key).await? {
            Some(bytes) => Ok(ChainIndexRecord::decode(&bytes).inspect_err(
                |e| warn!(key = %self.key, error = %e, "stored chain index is damaged"),
            )?),
            None => Ok(ChainIndexRecord::default()),
        }
    }

    async fn save(&self, rec: &ChainIndexRecord) -> Result<()> {
        self.store.meta_put(&self.key, &rec.encode()?).await?;
        Ok(())
    }

    /// Scans the blocks confirmed since the last scan (and the last
    /// [`IndexConfig::reread`] before them), stores the findings and the
    /// cursor, and answers: this account's channels and its credits now.
    pub async fn scan(&self) -> Result<ChainView> {
        let lock = self.lock();
        let _guard = lock.lock().await;
        let (rec, scan) = self.scan_locked().await?;
        let me = self.account.address();
        let (credits, unread) = self.credits(&rec, me).await?;
        Ok(ChainView {
            channels: channels(&rec),
            credits,
            unread,
            scan,
        })
    }

    /// Scans (as [`scan`](Self::scan)) and withdraws every credit found, to
    /// this account. Idempotent: a second call finds nothing to withdraw. A
    /// credit of a channel the client still holds may be withdrawn here
    /// too; its watcher then finds nothing left, which is harmless.
    pub async fn recover_funds(&self) -> Result<Recovered> {
        let view = self.scan().await?;
        let history = self.history()?;
        let mut out = Recovered {
            scan: view.scan,
            unread: view.unread,
            ..Recovered::default()
        };
        for credit in view.credits {
            match history
                .withdraw_credit(credit.holder, credit.channel, self.account.clone())
                .await
            {
                Ok(amount) if amount.is_zero() => {}
                Ok(amount) => {
                    info!(channel = %credit.channel, holder = %credit.holder, %amount, "recovered a credit");
                    out.withdrawn.push(Credit { amount, ..credit });
                }
                Err(e) => {
                    warn!(channel = %credit.channel, holder = %credit.holder, error = %e, "recovering a credit failed");
                    out.failed.push((credit, e.into()));
                }
            }
        }
        Ok(out)
    }

    async fn scan_locked(&self) -> Result<(ChainIndexRecord, ScanReport)> {
        let history = self.history()?;
        let me = self.account.address();
        let mut rec = self.load().await?;
        let first = history.first_block();
        let safe = history.confirmed_block().await?;
        let start = match rec.cursor {
            None => first,
            Some(c) => c
                .saturating_add(1)
                .saturating_sub(self.config.reread)
                .max(first),
        };
        let mut report = ScanReport {
            from: start,
            to: rec.cursor.unwrap_or(start.saturating_sub(1)),
            ..ScanReport::default()
        };
        if safe < start {
            debug!(start, safe, "chain index: nothing new is confirmed");
            return Ok((rec, report));
        }
        let before = rec.facts.len();
        rec.facts.retain(|f| f.block < start);
        report.dropped = before - rec.facts.len();
        let mut mine: HashSet<ChannelId> = rec.facts.iter().map(|f| f.channel).collect();
        let mut saved = Instant::now();
        let mut from = start;
        while from <= safe {
            let to = safe.min(from.saturating_add(self.config.range - 1));
            let page = match history.logs(from, to).await {
                Ok(p) => p,
                Err(e) => {
                    // What was read so far stays: the next scan goes on from there.
                    if from > start {
                        self.save(&rec).await?;
                    }
                    return Err(e.into());
                }
            };
            report.queries += 1;
            report.rejected += page.rejected.len();
            let (facts, rejected) = accept(page.logs, from, to, me, &mut mine);
            report.rejected += rejected;
            report.facts += facts.len();
            rec.facts.extend(facts);
            rec.cursor = Some(to);
            report.to = to;
            report.blocks_read += to - from + 1;
            from = to.saturating_add(1);
            if saved.elapsed() >= SAVE_EVERY && from <= safe {
                self.save(&rec).await?;
                saved = Instant::now();
            }
        }
        self.save(&rec).await?;
        debug!(?report, channels = mine.len(), "chain index scanned");
        Ok((rec, report))
    }

    /// The credits the facts point at, as the holders read them now: for
    /// each channel and holder where what was credited to this account, or
    /// deposited for it after the conclusion, exceeds what was withdrawn.
    async fn credits(
        &self,
        rec: &ChainIndexRecord,
        me: Address,
    ) -> Result<(Vec<Credit>, Vec<Unread>)> {
        let history = self.history()?;
        // (channel, holder) => whether its slot may hold something for us,
        // walking the facts in chain order. A deposit or a credit naming us
        // may leave something (before the conclusion it is a deposit; after
        // it, a credit: `holdings` tells which); a `Paid` to us means the
        // outcome emptied the slot. Logs only say where to look: whether a
        // channel is concluded is read, not inferred from a `Concluded` log
        // (which names no participant and may be in a range read before).
        let mut maybe: BTreeMap<(ChannelId, Address), bool> = BTreeMap::new();
        for f in &rec.facts {
            match &f.kind {
                FactKind::Deposited { holder, .. } | FactKind::Credited { holder, .. } => {
                    maybe.insert((f.channel, *holder), true);
                }
                FactKind::Paid { holder, .. } => {
                    maybe.insert((f.channel, *holder), false);
                }
                _ => {}
            }
        }
        let reads = maybe.into_iter().filter(|(_, maybe)| *maybe).map(
            |((channel, holder), _)| async move {
                (channel, holder, history.credit(holder, channel, me).await)
            },
        );
        let mut credits = Vec::new();
        let mut unread = Vec::new();
        let mut results = futures::stream::iter(reads).buffer_unordered(CREDIT_READS);
        while let Some((channel, holder, read)) = results.next().await {
            match read {
                Ok((amount, true)) if !amount.is_zero() => credits.push(Credit {
                    channel,
                    holder,
                    amount,
                }),
                Ok(_) => {}
                Err(e) => {
                    warn!(%channel, %holder, error = %e, "chain index: reading a credit failed");
                    unread.push(Unread {
                        channel,
                        holder,
                        error: Arc::new(e.into()),
                    });
                }
            }
        }
        credits.sort_by_key(|c| (c.channel, c.holder));
        Ok((credits, unread))
    }
}

/// The facts of one range's logs that concern `me`, in chain order: the
/// holders' logs naming `me`, and the adjudicator's logs of `me`'s channels
/// (those known before, or named by a holder log of this range). Returns
/// them and how many logs were refused (outside the range, or at a
/// position seen already).
fn accept(
    logs: Vec<ChainLog>,
    from: u64,
    to: u64,
    me: Address,
    mine: &mut HashSet<ChannelId>,
) -> (Vec<IndexedFact>, usize) {
    let mut rejected = 0;
    let mut refuse = |l: &ChainLog, reason: &'static str| {
        let e = Error::UntrustedLog {
            block: l.block,
            log_index: l.log_index,
            reason,
        };
        warn!(error = %e, "chain index: refusing a log");
        rejected += 1;
    };
    let mut placed: BTreeMap<(u64, u64), ChainLog> = BTreeMap::new();
    for l in logs {
        let pos = (l.block, l.log_index);
        if !(from..=to).contains(&l.block) {
            refuse(&l, "outside the range asked for");
            continue;
        }
        if placed.contains_key(&pos) {
            refuse(&l, "a second log at the same position");
            continue;
        }
        // A zero deposit moves nothing, and costs a stranger little: it
        // must not make a channel ours or grow the record.
        if matches!(l.fact, ChainFact::Deposited { amount, .. } if amount.is_zero()) {
            continue;
        }
        if l.fact.participant() == Some(me) {
            mine.insert(l.channel);
        }
        placed.insert(pos, l);
    }
    let facts = placed
        .into_values()
        .filter(|l| match l.fact.participant() {
            Some(p) => p == me,
            None => mine.contains(&l.channel),
        })
        .map(|l| IndexedFact {
            block: l.block,
            log_index: l.log_index,
            channel: l.channel,
            kind: kind(l.fact),
        })
        .collect();
    (facts, rejected)
}

/// A log's fact as stored (the participant is the account).
fn kind(fact: ChainFact) -> FactKind {
    match fact {
        ChainFact::Deposited { holder, amount, .. } => FactKind::Deposited { holder, amount },
        ChainFact::Registered { version, timeout } => FactKind::Registered { version, timeout },
        ChainFact::Concluded { version } => FactKind::Concluded { version },
        ChainFact::Paid { holder, amount, .. } => FactKind::Paid { holder, amount },
        ChainFact::Credited { holder, amount, .. } => FactKind::Credited { holder, amount },
        ChainFact::Withdrawn {
            holder,
            receiver,
            amount,
            ..
        } => FactKind::Withdrawn {
            holder,
            receiver,
            amount,
        },
    }
}

/// The channels of the facts, by id.
fn channels(rec: &ChainIndexRecord) -> Vec<ChainChannel> {
    let mut out: BTreeMap<ChannelId, ChainChannel> = BTreeMap::new();
    for f in &rec.facts {
        let ch = out.entry(f.channel).or_insert_with(|| ChainChannel {
            id: f.channel,
            ..ChainChannel::default()
        });
        let at = |holder: &Address, amount: &U256| ChainAmount {
            holder: *holder,
            amount: *amount,
            block: f.block,
        };
        match &f.kind {
            FactKind::Deposited { holder, amount } => ch.deposits.push(at(holder, amount)),
            FactKind::Registered { version, .. } => ch.registrations.push((*version, f.block)),
            FactKind::Concluded { version } => ch.concluded = Some((*version, f.block)),
            FactKind::Paid { holder, amount } => ch.paid.push(at(holder, amount)),
            FactKind::Credited { holder, amount } => ch.credited.push(at(holder, amount)),
            FactKind::Withdrawn { holder, amount, .. } => ch.withdrawn.push(at(holder, amount)),
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use perun_adjudicator::{
        Dispute, EventStream, Funder, FundingRequest, LogPage, SignedChannel, SimLedger,
        WithdrawRequest,
    };
    use perun_channel::{Allocation, Asset, B256, Domain, Params, SignedState, State};
    use perun_persistence::MemoryPersister;
    use perun_wallet::LocalAccount;

    use super::*;

    /// A chain whose logs and confirmed head the test sets, recording the ranges read.
    #[derive(Default)]
    struct Mock {
        logs: Mutex<Vec<ChainLog>>,
        safe: AtomicU64,
        reads: Mutex<Vec<(u64, u64)>>,
        credit: Mutex<HashMap<(ChannelId, Address), U256>>,
    }

    fn refused() -> perun_adjudicator::Error {
        perun_adjudicator::Error::Stopped
    }

    #[async_trait]
    impl Adjudicator for Mock {
        fn domain(&self) -> Domain {
            Domain {
                chain_id: U256::from(1),
                adjudicator: Address::repeat_byte(0xad),
            }
        }
        async fn register(&self, _: &SignedChannel) -> perun_adjudicator::Result<()> {
            Err(refused())
        }
        async fn progress(
            &self,
            _: &perun_adjudicator::ProgressRequest,
        ) -> perun_adjudicator::Result<()> {
            Err(refused())
        }
        async fn conclude(&self, _: &SignedChannel) -> perun_adjudicator::Result<()> {
            Err(refused())
        }
        async fn withdraw(&self, _: &WithdrawRequest) -> perun_adjudicator::Result<()> {
            Err(refused())
        }
        async fn subscribe(&self, _: ChannelId) -> perun_adjudicator::Result<EventStream> {
            Err(refused())
        }
        async fn dispute(&self, _: ChannelId) -> perun_adjudicator::Result<Option<Dispute>> {
            Err(refused())
        }
        fn history(&self) -> Option<&dyn ChainHistory> {
            Some(self)
        }
    }

    #[async_trait]
    impl ChainHistory for Mock {
        fn first_block(&self) -> u64 {
            100
        }
        async fn confirmed_block(&self) -> perun_adjudicator::Result<u64> {
            Ok(self.safe.load(Ordering::SeqCst))
        }
        async fn logs(&self, from: u64, to: u64) -> perun_adjudicator::Result<LogPage> {
            self.reads.lock().unwrap().push((from, to));
            let logs = self.logs.lock().unwrap();
            Ok(LogPage {
                logs: logs
                    .iter()
                    .filter(|l| (from..=to).contains(&l.block))
                    .cloned()
                    .collect(),
                rejected: Vec::new(),
            })
        }
        async fn credit(
            &self,
            _: Address,
            channel: ChannelId,
            participant: Address,
        ) -> perun_adjudicator::Result<(U256, bool)> {
            let c = self.credit.lock().unwrap();
            Ok((
                c.get(&(channel, participant)).copied().unwrap_or_default(),
                true,
            ))
        }
        async fn withdraw_credit(
            &self,
            _: Address,
            channel: ChannelId,
            account: Arc<dyn Account>,
        ) -> perun_adjudicator::Result<U256> {
            let mut c = self.credit.lock().unwrap();
            Ok(c.remove(&(channel, account.address())).unwrap_or_default())
        }
    }

    const HOLDER: Address = Address::repeat_byte(0xee);

    fn deposit(block: u64, channel: u8, who: Address, amount: u64) -> ChainLog {
        ChainLog {
            block,
            log_index: 0,
            channel: B256::repeat_byte(channel),
            fact: ChainFact::Deposited {
                holder: HOLDER,
                participant: who,
                amount: U256::from(amount),
            },
        }
    }

    fn index(mock: &Arc<Mock>, store: &Arc<MemoryPersister>, me: &Arc<LocalAccount>) -> ChainIndex {
        let cfg = IndexConfig {
            reread: 64,
            range: 1_000,
        };
        ChainIndex::new(mock.clone(), store.clone(), me.clone(), cfg).unwrap()
    }

    fn deposits(view: &ChainView) -> Vec<(u8, u64)> {
        view.channels
            .iter()
            .flat_map(|c| c.deposits.iter().map(|d| (c.id[0], d.block)))
            .collect()
    }

    #[tokio::test]
    async fn a_rescan_reads_the_new_blocks_and_the_last_64_and_counts_nothing_twice() {
        let (mock, store) = (Arc::new(Mock::default()), Arc::new(MemoryPersister::new()));
        let me = Arc::new(LocalAccount::random());
        let other = Address::repeat_byte(0x0b);
        mock.logs.lock().unwrap().extend([
            deposit(150, 1, me.address(), 5),
            deposit(160, 2, other, 5), // someone else's channel
            deposit(3_090, 3, me.address(), 7),
        ]);
        mock.safe.store(3_100, Ordering::SeqCst);
        let view = index(&mock, &store, &me).scan().await.unwrap();
        assert_eq!(view.scan.from, 100, "from the deployment block");
        assert_eq!(view.scan.blocks_read, 3_001);
        assert_eq!(view.scan.queries, 4, "ranges of at most 1,000 blocks");
        assert_eq!(deposits(&view), vec![(1, 150), (3, 3_090)]);

        // A new index over the same store goes on from the stored cursor.
        mock.reads.lock().unwrap().clear();
        mock.logs
            .lock()
            .unwrap()
            .push(deposit(3_150, 4, me.address(), 1));
        mock.safe.store(3_200, Ordering::SeqCst);
        let view = index(&mock, &store, &me).scan().await.unwrap();
        assert_eq!(view.scan.from, 3_101 - 64);
        assert_eq!(
            view.scan.blocks_read,
            100 + 64,
            "new blocks and the last 64"
        );
        assert_eq!(*mock.reads.lock().unwrap(), vec![(3_037, 3_200)]);
        assert_eq!(
            view.scan.dropped, 1,
            "the deposit of block 3,090 is read again"
        );
        assert_eq!(deposits(&view), vec![(1, 150), (3, 3_090), (4, 3_150)]);

        // Nothing new confirmed: nothing read, the answer stays.
        let view = index(&mock, &store, &me).scan().await.unwrap();
        assert_eq!(view.scan.blocks_read, 64);
        assert_eq!(deposits(&view).len(), 3);
    }

    #[tokio::test]
    async fn a_reorg_within_the_reread_blocks_replaces_what_it_changed() {
        let (mock, store) = (Arc::new(Mock::default()), Arc::new(MemoryPersister::new()));
        let me = Arc::new(LocalAccount::random());
        mock.logs.lock().unwrap().extend([
            deposit(500, 1, me.address(), 5),
            deposit(990, 2, me.address(), 5),
        ]);
        mock.safe.store(1_000, Ordering::SeqCst);
        let view = index(&mock, &store, &me).scan().await.unwrap();
        assert_eq!(deposits(&view), vec![(1, 500), (2, 990)]);
        // The chain from block 980 on is replaced: channel 2's deposit moved, a new one came.
        {
            let mut logs = mock.logs.lock().unwrap();
            logs.retain(|l| l.block < 980);
            logs.push(deposit(995, 2, me.address(), 5));
            logs.push(deposit(1_005, 5, me.address(), 9));
        }
        mock.safe.store(1_010, Ordering::SeqCst);
        let view = index(&mock, &store, &me).scan().await.unwrap();
        assert_eq!(deposits(&view), vec![(1, 500), (2, 995), (5, 1_005)]);
    }

    #[tokio::test]
    async fn untrusted_logs_are_refused_and_never_counted() {
        let (mock, store) = (Arc::new(Mock::default()), Arc::new(MemoryPersister::new()));
        let me = Arc::new(LocalAccount::random());
        let mut twin = deposit(200, 1, me.address(), 99);
        twin.channel = B256::repeat_byte(7);
        mock.logs.lock().unwrap().extend([
            deposit(200, 1, me.address(), 5),
            twin, // the same position again
        ]);
        mock.safe.store(300, Ordering::SeqCst);
        let view = index(&mock, &store, &me).scan().await.unwrap();
        assert_eq!(view.scan.rejected, 1);
        assert_eq!(deposits(&view), vec![(1, 200)]);

        // A damaged stored record is an error, not an empty index.
        store
            .meta_put(&index(&mock, &store, &me).key, b"garbage")
            .await
            .unwrap();
        let e = index(&mock, &store, &me).scan().await.unwrap_err();
        assert!(matches!(e, Error::Persistence(_)), "{e}");
    }

    #[tokio::test]
    async fn a_backend_without_history_is_a_typed_error() {
        #[derive(Default)]
        struct NoHistory(Mock);
        #[async_trait]
        impl Adjudicator for NoHistory {
            fn domain(&self) -> Domain {
                self.0.domain()
            }
            async fn register(&self, r: &SignedChannel) -> perun_adjudicator::Result<()> {
                self.0.register(r).await
            }
            async fn progress(
                &self,
                r: &perun_adjudicator::ProgressRequest,
            ) -> perun_adjudicator::Result<()> {
                self.0.progress(r).await
            }
            async fn conclude(&self, r: &SignedChannel) -> perun_adjudicator::Result<()> {
                self.0.conclude(r).await
            }
            async fn withdraw(&self, r: &WithdrawRequest) -> perun_adjudicator::Result<()> {
                self.0.withdraw(r).await
            }
            async fn subscribe(&self, id: ChannelId) -> perun_adjudicator::Result<EventStream> {
                self.0.subscribe(id).await
            }
            async fn dispute(&self, id: ChannelId) -> perun_adjudicator::Result<Option<Dispute>> {
                self.0.dispute(id).await
            }
        }
        let e = ChainIndex::new(
            Arc::new(NoHistory::default()),
            Arc::new(MemoryPersister::new()),
            Arc::new(LocalAccount::random()),
            IndexConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::NoChainHistory));
    }

    /// A two-party channel on `ledger`, funded by both; concluded with
    /// `alice` refusing payments, so her share stays credited.
    async fn credited_channel(
        ledger: &SimLedger,
        alice: &LocalAccount,
        bob: &LocalAccount,
    ) -> (Params, State) {
        let eth = HOLDER;
        let funding = vec![vec![U256::from(10); 2]];
        let params = Params::payment(
            ledger.domain(),
            60,
            U256::from(rand::random::<u64>()),
            vec![alice.address(), bob.address()],
            funding.clone(),
        );
        let asset = Asset {
            chainId: ledger.chain_id(),
            holder: eth,
        };
        let state = State::initial(&params, Allocation::new(vec![asset], funding));
        for index in 0..2 {
            let req = FundingRequest {
                params: params.clone(),
                state: state.clone(),
                index,
                timeout: Duration::ZERO,
            };
            let _ = ledger.fund(req).await;
        }
        let mut fin = state.next();
        fin.isFinal = true;
        let mut signed = SignedState::new(fin.clone());
        signed.sign(&params, 0, alice).unwrap();
        signed.sign(&params, 1, bob).unwrap();
        ledger.set_rejecting(alice.address(), true);
        ledger
            .conclude(&SignedChannel {
                params: params.clone(),
                state: signed,
            })
            .await
            .unwrap();
        ledger.set_rejecting(alice.address(), false);
        (params, fin)
    }

    #[tokio::test]
    async fn recover_funds_on_the_sim_ledger_pays_credits_and_late_deposits_once() {
        let ledger = SimLedger::new(1337);
        ledger.add_asset(HOLDER);
        let (alice, bob) = (Arc::new(LocalAccount::random()), LocalAccount::random());
        for who in [alice.address(), bob.address()] {
            ledger.mint(HOLDER, who, U256::from(100));
        }
        let (params, _) = credited_channel(&ledger, &alice, &bob).await;
        let id = params.channel_id();
        // A deposit after the conclusion is withdrawable at once (it adds to her credit of 10).
        let (ten, three) = (U256::from(10), U256::from(3));
        ledger
            .deposit_to(HOLDER, alice.address(), id, alice.address(), ten, three)
            .unwrap();
        assert_eq!(ledger.balance(HOLDER, alice.address()), U256::from(87));

        let store: Arc<dyn Persister> = Arc::new(MemoryPersister::new());
        let adj: Arc<dyn Adjudicator> = Arc::new(ledger.clone());
        let index = ChainIndex::new(adj, store, alice.clone(), IndexConfig::default()).unwrap();
        let view = index.scan().await.unwrap();
        assert_eq!(view.channels.len(), 1);
        let ch = &view.channels[0];
        assert_eq!(ch.id, id);
        assert_eq!(ch.deposits.len(), 2, "the funding and the late deposit");
        assert_eq!(ch.credited.len(), 1);
        assert!(ch.concluded.is_some());
        assert_eq!(
            view.credits,
            vec![Credit {
                channel: id,
                holder: HOLDER,
                amount: U256::from(13)
            }]
        );

        let got = index.recover_funds().await.unwrap();
        assert_eq!(got.total(HOLDER), U256::from(13));
        assert!(got.failed.is_empty());
        assert_eq!(ledger.balance(HOLDER, alice.address()), U256::from(100));
        let again = index.recover_funds().await.unwrap();
        assert!(again.withdrawn.is_empty() && again.failed.is_empty());
        assert_eq!(ledger.balance(HOLDER, alice.address()), U256::from(100));
        let view = index.scan().await.unwrap();
        assert!(view.credits.is_empty());
        assert_eq!(view.channels[0].withdrawn.len(), 1);
    }
}
