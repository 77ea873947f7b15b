//! One transaction queue per account: every transaction a process sends from
//! one (chain id, sender) goes through one task, which assigns the nonces,
//! prices, replaces and tracks them until they are confirmed.
//!
//! # Why one task
//! Transactions that each take the node's pending nonce collide ("nonce too
//! low", "replacement transaction underpriced") as soon as two are sent at
//! once, and a failed submission leaves a gap that blocks every later one. So
//! the handles of one account ([`EthFunder`](super::EthFunder),
//! [`EthAdjudicator`](super::EthAdjudicator), their clones, several built for
//! the same account) find one [`TxQueue`] through a process-wide registry
//! (weak references), and its task does all of it in order.
//!
//! # What a request goes through
//! 1. Simulation (`eth_call` from the sender at the latest block): a doomed
//!    request is answered with its decoded revert and costs nothing.
//! 2. Gas estimate (plus a fifth) and fees ([`fees`](super::fees)): the
//!    tip follows the node under `max_priority_fee_per_gas`, the max fee is
//!    `2 * base + tip` under `max_fee_per_gas`. If the base fee alone is above
//!    the cap the caller gets `FeeCapExceeded` at once, and the request waits
//!    in the queue until the base fee drops (it is re-simulated first).
//! 3. The next nonce (the node's `pending` count, read at start, after a
//!    nonce error and whenever the queue was idle); a submission the node
//!    refuses does not use it up.
//! 4. Tracking, every block (or poll): a transaction not mined after
//!    `replace_after` is replaced at the same nonce with both fees up by an
//!    eighth (within the caps); one that left the pool unmined is sent again
//!    (with higher fees if the old ones no longer fit); if the nonce was used,
//!    whichever of its fee versions was mined is the result (one the node
//!    shows in a block but has no receipt for yet is waited for), and if
//!    none was (another transaction of the same account took the nonce),
//!    the request is simulated and sent again with a fresh nonce. A
//!    submission answered "nonce too low" that the node has anyway (it
//!    reached the node twice) counts as sent.
//! 5. Confirmation: the receipt counts once its block is `confirmations`
//!    deep and still canonical (a reorg that removed it puts the transaction
//!    back into tracking). A reverted receipt is answered with the revert
//!    decoded from re-running the call at its block.
//!
//! A caller waits at most `receipt_timeout` and then gets `ReceiptTimeout`
//! (or `NotSent`), but the queue keeps the transaction going until it lands or
//! is moot. A request with a dedupe key that matches one in flight joins it
//! and gets the same outcome instead of sending again. If the task dies,
//! waiting callers get `Stopped` and the next request starts a new task.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use alloy::eips::eip2718::Encodable2718;
use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::network::{Ethereum, NetworkWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::conn::{Conn, Fault, Heads};
use super::fees::{self, Caps, Fees};
use crate::{Error, EthConfig, Result, RpcFailure};

/// How often tracking runs without block headers.
const POLL: Duration = Duration::from_secs(1);
/// Nonce errors in a row after which a submission gives up (each re-reads the nonce).
const NONCE_RETRIES: usize = 4;
/// Ticks a used nonce must show no receipt of ours before it counts as taken by another transaction.
const FOREIGN_TICKS: u8 = 2;

/// What to send: a call of one of our contracts.
#[derive(Debug, Clone)]
pub(super) struct Call {
    /// What it does, for errors and logs.
    pub(super) op: &'static str,
    /// The contract.
    pub(super) to: Address,
    /// The ABI-encoded call.
    pub(super) input: Bytes,
    /// Wei sent along.
    pub(super) value: U256,
    /// Requests with the same key while one is in flight share its outcome.
    pub(super) key: Option<B256>,
}

/// How a transaction is priced, replaced and confirmed (from the sender's config).
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    confirmations: u64,
    caps: Caps,
    replace_after: Duration,
}

impl Policy {
    /// The config's policy.
    pub(super) fn of(cfg: &EthConfig) -> Self {
        Self {
            confirmations: cfg.depth(),
            caps: Caps {
                max_fee: cfg.max_fee_per_gas,
                tip: cfg.max_priority_fee_per_gas,
            },
            replace_after: cfg.replace_after,
        }
    }
}

/// A transaction mined, confirmed and not reverted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Landed {
    /// The hash of the fee version that was mined.
    pub(super) tx: B256,
    /// Its block.
    pub(super) block: u64,
    /// Gas it used.
    pub(super) gas_used: u64,
}

/// Why a request failed for good (cloneable: joined callers share it).
#[derive(Debug, Clone)]
enum Failed {
    /// The simulation (`tx: None`) or the mined transaction reverted with this data.
    Reverted { tx: Option<B256>, data: Bytes },
    /// The node failed before anything was sent.
    Rpc(RpcFailure),
    /// The sender cannot pay gas and value.
    Insufficient { need: U256, have: U256 },
}

impl Failed {
    fn into_error(self, op: &'static str) -> Error {
        match self {
            Failed::Reverted { tx, data } => super::revert::decode(op, tx, &data),
            Failed::Rpc(source) => Error::Rpc { op, source },
            Failed::Insufficient { need, have } => Error::InsufficientFunds { need, have },
        }
    }
}

impl From<Fault> for Failed {
    fn from(f: Fault) -> Self {
        match f {
            Fault::Rpc(f) => Failed::Rpc(f),
            Fault::Revert(data) => Failed::Reverted { tx: None, data },
        }
    }
}

/// Where a request stands, as its callers see it.
#[derive(Debug, Clone)]
enum Status {
    /// Not sent yet.
    Queued,
    /// Not sent: the base fee is above the cap.
    FeeCapped { needed: u128, cap: u128 },
    /// Sent; the hash of its newest fee version.
    Sent(B256),
    /// Confirmed, or failed for good.
    Done(std::result::Result<Landed, Failed>),
}

/// The requests in flight by dedupe key.
type Keys = Arc<Mutex<HashMap<B256, watch::Receiver<Status>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single insert, remove or swap: a panic cannot tear it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which account a queue sends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Account {
    chain_id: u64,
    sender: Address,
}

/// Every account's queue in this process.
static QUEUES: LazyLock<Mutex<HashMap<Account, Weak<TxQueue>>>> = LazyLock::new(Mutex::default);

/// The queue of one account: the handles' end of the task.
#[derive(Debug)]
pub(super) struct TxQueue {
    account: Account,
    conn: Arc<Conn>,
    task: Mutex<Option<Task>>,
}

/// A running task: where requests go and what is in flight.
#[derive(Debug)]
struct Task {
    jobs: mpsc::UnboundedSender<Job>,
    keys: Keys,
    /// For `testing::abort_tx_queue` (kills the task, as a panic would).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    abort: tokio::task::AbortHandle,
}

#[derive(Debug)]
struct Job {
    call: Call,
    policy: Policy,
    status: watch::Sender<Status>,
}

impl TxQueue {
    /// The account's queue, shared with every other handle of it in the
    /// process; `conn` is used if the queue is created here.
    pub(super) fn shared(conn: &Arc<Conn>, chain_id: u64, sender: Address) -> Arc<Self> {
        let account = Account { chain_id, sender };
        let mut queues = lock(&QUEUES);
        queues.retain(|_, q| q.strong_count() > 0);
        if let Some(q) = queues.get(&account).and_then(Weak::upgrade) {
            return q;
        }
        let q = Arc::new(Self {
            account,
            conn: conn.clone(),
            task: Mutex::new(None),
        });
        queues.insert(account, Arc::downgrade(&q));
        q
    }

    /// Sends `call` and waits (at most `wait`) until it is confirmed.
    pub(super) async fn send(
        self: &Arc<Self>,
        call: Call,
        policy: Policy,
        wait: Duration,
    ) -> Result<Landed> {
        let op = call.op;
        let mut status = self.submit(call, policy)?;
        let deadline = Instant::now() + wait;
        let mut sent = None;
        loop {
            match status.borrow_and_update().clone() {
                Status::Done(Ok(landed)) => return Ok(landed),
                Status::Done(Err(failed)) => return Err(failed.into_error(op)),
                Status::FeeCapped { needed, cap } => {
                    return Err(Error::FeeCapExceeded { op, needed, cap });
                }
                Status::Sent(tx) => sent = Some(tx),
                Status::Queued => {}
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    warn!(op, "the transaction queue's task stopped");
                    return Err(Error::Stopped);
                }
                Err(_) => {
                    return Err(match sent {
                        Some(tx) => {
                            warn!(op, %tx, ?wait, "no receipt in time; the queue keeps the transaction");
                            Error::ReceiptTimeout {
                                op,
                                tx,
                                waited: wait,
                            }
                        }
                        None => Error::NotSent { op, waited: wait },
                    });
                }
            }
        }
    }

    /// Hands `call` to the task (started if none runs), or joins the request with its key.
    fn submit(self: &Arc<Self>, call: Call, policy: Policy) -> Result<watch::Receiver<Status>> {
        let mut task = lock(&self.task);
        let task = match &mut *task {
            Some(t) if !t.jobs.is_closed() => t,
            slot => {
                if slot.is_some() {
                    warn!(sender = %self.account.sender, "the transaction queue's task had stopped; starting a new one");
                }
                slot.insert(self.spawn())
            }
        };
        let mut keys = lock(&task.keys);
        if let Some(key) = call.key
            && let Some(rx) = keys.get(&key)
            && rx.has_changed().is_ok()
            && !matches!(*rx.borrow(), Status::Done(_))
        {
            debug!(op = call.op, %key, "joining the same transaction in flight");
            return Ok(rx.clone());
        }
        let (tx, rx) = watch::channel(Status::Queued);
        if let Some(key) = call.key {
            keys.insert(key, rx.clone());
        }
        let job = Job {
            call,
            policy,
            status: tx,
        };
        task.jobs.send(job).map_err(|_| Error::Stopped)?;
        Ok(rx)
    }

    fn spawn(self: &Arc<Self>) -> Task {
        let (jobs_tx, jobs) = mpsc::unbounded_channel();
        let keys = Keys::default();
        let worker = Worker {
            conn: self.conn.clone(),
            account: self.account,
            queue: Arc::downgrade(self),
            keepalive: None,
            jobs,
            keys: keys.clone(),
            next_nonce: None,
            waiting: VecDeque::new(),
            sent: BTreeMap::new(),
        };
        let span =
            info_span!("tx_queue", sender = %self.account.sender, chain = self.account.chain_id);
        let handle = tokio::spawn(worker.run().instrument(span));
        let abort = handle.abort_handle();
        let sender = self.account.sender;
        // Supervision: a task that dies says so; the next request starts a new one.
        tokio::spawn(async move {
            match handle.await {
                Ok(()) => debug!(%sender, "transaction queue idle and unused; stopped"),
                Err(e) if e.is_panic() => error!(%sender, "transaction queue task panicked"),
                Err(_) => warn!(%sender, "transaction queue task was cancelled"),
            }
        });
        Task {
            jobs: jobs_tx,
            keys,
            abort,
        }
    }
}

/// Ends the queue task of an account as if it had died (tests).
#[cfg(feature = "testing")]
pub(crate) fn abort(chain_id: u64, sender: Address) -> bool {
    let queue = lock(&QUEUES)
        .get(&Account { chain_id, sender })
        .and_then(Weak::upgrade);
    let Some(queue) = queue else { return false };
    let task = lock(&queue.task);
    match &*task {
        Some(t) => {
            t.abort.abort();
            true
        }
        None => false,
    }
}

/// A request in the task.
#[derive(Debug)]
struct Entry {
    call: Call,
    policy: Policy,
    status: watch::Sender<Status>,
    /// The gas limit, fixed at the first submission.
    gas: u64,
    /// Every fee version sent at this nonce, oldest first.
    versions: Vec<Version>,
    /// When to consider replacing it next.
    replace_at: Option<Instant>,
    /// Its receipt, once found.
    mined: Option<Mined>,
    /// Ticks its nonce was used without a receipt of ours.
    foreign: u8,
    /// Whether the fee cap held it back already (logged once).
    capped: bool,
}

/// One signed fee version of a transaction.
#[derive(Debug, Clone)]
struct Version {
    hash: B256,
    fees: Fees,
    /// The signed transaction, if signed here (else the provider signs it again, identically).
    raw: Option<Bytes>,
}

#[derive(Debug, Clone, Copy)]
struct Mined {
    tx: B256,
    block: u64,
    block_hash: B256,
    ok: bool,
    gas_used: u64,
}

/// What a first submission came to.
enum Step {
    Sent(u64),
    Wait,
    Fail(Failed),
}

/// What the node said to a submission.
enum Rejected {
    /// The same transaction is in the pool already.
    Known(RpcFailure),
    /// The nonce is used, or taken by a pending transaction that pays more.
    NonceTaken(RpcFailure),
    /// The fees are below what the node accepts now.
    Underpriced,
    /// The sender cannot pay.
    Insufficient,
    /// No answer: it may or may not have been accepted.
    Ambiguous(RpcFailure),
    /// Anything else.
    Other(Failed),
}

fn rejection(f: Fault) -> Rejected {
    match f {
        Fault::Revert(data) => Rejected::Other(Failed::Reverted { tx: None, data }),
        Fault::Rpc(RpcFailure::Node { code, message }) => {
            let m = message.to_lowercase();
            let failure = || RpcFailure::Node {
                code,
                message: message.clone(),
            };
            if m.contains("already known")
                || m.contains("already imported")
                || m.contains("known transaction")
            {
                Rejected::Known(failure())
            } else if m.contains("nonce") || m.contains("replacement") {
                Rejected::NonceTaken(failure())
            } else if m.contains("insufficient funds") {
                Rejected::Insufficient
            } else if m.contains("underpriced") || m.contains("base fee") || m.contains("fee cap") {
                Rejected::Underpriced
            } else {
                Rejected::Other(Failed::Rpc(RpcFailure::Node { code, message }))
            }
        }
        Fault::Rpc(other) => Rejected::Ambiguous(other),
    }
}

/// What tracking decided for a sent transaction.
enum Check {
    Keep,
    Done(std::result::Result<Landed, Failed>),
    /// Its nonce went to another transaction of the account: send it again.
    Requeue,
}

/// The task.
struct Worker {
    conn: Arc<Conn>,
    account: Account,
    queue: Weak<TxQueue>,
    /// Holds the queue (and so the registry entry) while anything is in flight,
    /// so a new handle of the account finds this task instead of starting a second.
    keepalive: Option<Arc<TxQueue>>,
    jobs: mpsc::UnboundedReceiver<Job>,
    keys: Keys,
    /// The next nonce to use; `None`: read the node's pending count first.
    next_nonce: Option<u64>,
    /// Requests not sent yet, in order.
    waiting: VecDeque<Entry>,
    /// Sent transactions by nonce.
    sent: BTreeMap<u64, Entry>,
}

impl Worker {
    async fn run(mut self) {
        let mut heads = Heads::new(self.conn.clone(), POLL);
        let mut open = true;
        debug!("transaction queue started");
        loop {
            loop {
                match self.jobs.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.send_waiting().await;
            self.track().await;
            if self.waiting.is_empty() && self.sent.is_empty() {
                // Idle: other processes may use the account meanwhile.
                self.next_nonce = None;
                self.keepalive = None;
                if !open {
                    return;
                }
                match self.jobs.recv().await {
                    Some(job) => self.accept(job),
                    None => return,
                }
                continue;
            }
            heads.ensure().await;
            tokio::select! {
                job = self.jobs.recv(), if open => match job {
                    Some(job) => self.accept(job),
                    None => open = false,
                },
                () = heads.recv() => {}
            }
        }
    }

    fn accept(&mut self, job: Job) {
        if self.keepalive.is_none() {
            self.keepalive = self.queue.upgrade();
        }
        debug!(op = job.call.op, "queued");
        self.waiting.push_back(Entry {
            call: job.call,
            policy: job.policy,
            status: job.status,
            gas: 0,
            versions: Vec::new(),
            replace_at: None,
            mined: None,
            foreign: 0,
            capped: false,
        });
    }

    /// Answers a request and forgets its key.
    fn finish(&self, e: Entry, result: std::result::Result<Landed, Failed>) {
        match &result {
            Ok(l) => {
                info!(op = e.call.op, tx = %l.tx, block = l.block, gas = l.gas_used, "confirmed")
            }
            Err(f) => debug!(op = e.call.op, ?f, "failed"),
        }
        if let Some(key) = e.call.key {
            let mut keys = lock(&self.keys);
            let ours = e.status.subscribe();
            if keys.get(&key).is_some_and(|rx| rx.same_channel(&ours)) {
                keys.remove(&key);
            }
        }
        e.status.send_replace(Status::Done(result));
    }

    /// The call as a transaction request from the sender, unsigned and unpriced.
    fn request(&self, call: &Call) -> TransactionRequest {
        TransactionRequest::default()
            .with_from(self.account.sender)
            .with_to(call.to)
            .with_input(call.input.clone())
            .with_value(call.value)
    }

    fn priced(&self, e: &Entry, nonce: u64, fees: Fees) -> TransactionRequest {
        self.request(&e.call)
            .with_nonce(nonce)
            .with_gas_limit(e.gas)
            .with_max_fee_per_gas(fees.max_fee)
            .with_max_priority_fee_per_gas(fees.tip)
            .with_chain_id(self.account.chain_id)
    }

    /// Sends every waiting request in order; those the fee cap holds back stay.
    async fn send_waiting(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for mut e in waiting {
            match self.first_send(&mut e).await {
                Step::Sent(nonce) => {
                    self.sent.insert(nonce, e);
                }
                Step::Wait => self.waiting.push_back(e),
                Step::Fail(f) => self.finish(e, Err(f)),
            }
        }
    }

    /// Simulates, prices and sends a request with the next nonce.
    async fn first_send(&mut self, e: &mut Entry) -> Step {
        let op = e.call.op;
        let req = self.request(&e.call);
        let sim = req.clone();
        let simulated = self
            .conn
            .try_rpc("eth_call", |p| async move {
                p.call(sim).block(BlockId::latest()).await
            })
            .await;
        if let Err(f) = simulated {
            return Step::Fail(f.into());
        }
        let estimate = req.clone();
        let gas = match self
            .conn
            .try_rpc("eth_estimateGas", |p| async move {
                p.estimate_gas(estimate).await
            })
            .await
        {
            Ok(g) => g.saturating_add(g / 5),
            Err(f) => return Step::Fail(f.into()),
        };
        let (base, suggested) = match self.market().await {
            Ok(m) => m,
            Err(f) => return Step::Fail(f),
        };
        let fees = match fees::initial(base, suggested, e.policy.caps) {
            Ok(fees) => fees,
            Err(needed) => {
                let cap = e.policy.caps.max_fee;
                if !e.capped {
                    warn!(
                        op,
                        needed, cap, "base fee above the cap; waiting for it to drop"
                    );
                    e.capped = true;
                }
                e.status.send_replace(Status::FeeCapped { needed, cap });
                return Step::Wait;
            }
        };
        e.gas = gas;
        let mut last = RpcFailure::Missing("a nonce");
        for _ in 0..NONCE_RETRIES {
            let nonce = match self.nonce().await {
                Ok(n) => n,
                Err(f) => return Step::Fail(f),
            };
            match self.broadcast(self.priced(e, nonce, fees), fees).await {
                Ok(v) => {
                    info!(op, nonce, tx = %v.hash, gas, max_fee = fees.max_fee, tip = fees.tip, "sent");
                    e.status.send_replace(Status::Sent(v.hash));
                    e.versions.push(v);
                    e.replace_at = Some(Instant::now() + e.policy.replace_after);
                    self.next_nonce = Some(nonce.saturating_add(1));
                    return Step::Sent(nonce);
                }
                Err(Rejected::NonceTaken(f) | Rejected::Known(f)) => {
                    debug!(op, nonce, %f, "nonce taken; reading it again");
                    self.next_nonce = None;
                    last = f;
                }
                Err(Rejected::Underpriced) => {
                    debug!(op, "fees below what the node takes now; next block");
                    return Step::Wait;
                }
                Err(Rejected::Insufficient) => return Step::Fail(self.insufficient(e, fees).await),
                Err(Rejected::Ambiguous(f)) => {
                    // Signed by the provider and no answer: it may be in the pool.
                    // The pending count says; the request is for the caller to repeat.
                    self.next_nonce = None;
                    return Step::Fail(Failed::Rpc(f));
                }
                Err(Rejected::Other(f)) => return Step::Fail(f),
            }
        }
        warn!(op, %last, "nonce taken again and again; giving up on this request");
        Step::Fail(Failed::Rpc(last))
    }

    /// The nonce for the next transaction.
    async fn nonce(&mut self) -> std::result::Result<u64, Failed> {
        if let Some(n) = self.next_nonce {
            return Ok(n);
        }
        let sender = self.account.sender;
        let n = self
            .conn
            .try_rpc("eth_getTransactionCount", |p| async move {
                p.get_transaction_count(sender).pending().await
            })
            .await?;
        debug!(nonce = n, "pending nonce read");
        self.next_nonce = Some(n);
        Ok(n)
    }

    /// The latest base fee and the node's suggested tip.
    async fn market(&self) -> std::result::Result<(u128, u128), Failed> {
        let block = self
            .conn
            .try_rpc("eth_getBlockByNumber", |p| async move {
                p.get_block_by_number(BlockNumberOrTag::Latest).await
            })
            .await?
            .ok_or(Failed::Rpc(RpcFailure::Missing("the latest block")))?;
        let base = block
            .header
            .base_fee_per_gas
            .ok_or(Failed::Rpc(RpcFailure::Missing("a base fee (EIP-1559)")))?;
        let tip = self
            .conn
            .try_rpc("eth_maxPriorityFeePerGas", |p| async move {
                p.get_max_priority_fee_per_gas().await
            })
            .await?;
        Ok((u128::from(base), tip))
    }

    /// What the sender lacks for gas and value at `fees`.
    async fn insufficient(&self, e: &Entry, fees: Fees) -> Failed {
        let sender = self.account.sender;
        let need = U256::from(e.gas)
            .saturating_mul(U256::from(fees.max_fee))
            .saturating_add(e.call.value);
        match self
            .conn
            .try_rpc(
                "eth_getBalance",
                |p| async move { p.get_balance(sender).await },
            )
            .await
        {
            Ok(have) => {
                warn!(op = e.call.op, %need, %have, "the sender cannot pay for the transaction");
                Failed::Insufficient { need, have }
            }
            Err(f) => f.into(),
        }
    }

    /// Signs (here if we hold the key, else through the provider) and sends.
    async fn broadcast(
        &self,
        req: TransactionRequest,
        fees: Fees,
    ) -> std::result::Result<Version, Rejected> {
        if let Some(wallet) = self.conn.wallet() {
            let signed = NetworkWallet::<Ethereum>::sign_request(wallet, req)
                .await
                .map_err(|e| Rejected::Other(Failed::Rpc(RpcFailure::Transport(Arc::new(e)))))?;
            let v = Version {
                hash: *signed.tx_hash(),
                fees,
                raw: Some(Bytes::from(signed.encoded_2718())),
            };
            return match self.send_raw(&v).await {
                // A submission that reached the node twice (a reconnecting
                // transport sends its requests again) finds its own nonce
                // used: it is sent, not refused.
                Err(Rejected::NonceTaken(f)) if self.node_knows(v.hash).await => {
                    debug!(tx = %v.hash, %f, "the node has this transaction already");
                    Ok(v)
                }
                Err(r) => Err(r),
                Ok(()) => Ok(v),
            };
        }
        let hash = self
            .conn
            .try_rpc("eth_sendTransaction", |p| async move {
                p.send_transaction(req).await.map(|p| *p.tx_hash())
            })
            .await
            .map_err(rejection)?;
        Ok(Version {
            hash,
            fees,
            raw: None,
        })
    }

    /// Sends a transaction signed here; no answer counts as sent (tracking finds out).
    async fn send_raw(&self, v: &Version) -> std::result::Result<(), Rejected> {
        let Some(raw) = v.raw.clone() else {
            return Ok(());
        };
        let sent = self
            .conn
            .try_rpc("eth_sendRawTransaction", |p| async move {
                p.send_raw_transaction(&raw).await.map(|p| *p.tx_hash())
            })
            .await;
        match sent.map_err(rejection) {
            Ok(_) | Err(Rejected::Known(_)) => Ok(()),
            Err(Rejected::Ambiguous(f)) => {
                warn!(tx = %v.hash, %f, "no answer to the submission; tracking the transaction anyway");
                Ok(())
            }
            Err(r) => Err(r),
        }
    }

    /// Sends a fee version again, as it was.
    async fn resend(
        &self,
        e: &Entry,
        nonce: u64,
        v: &Version,
    ) -> std::result::Result<(), Rejected> {
        if v.raw.is_some() {
            return self.send_raw(v).await;
        }
        match self.broadcast(self.priced(e, nonce, v.fees), v.fees).await {
            Ok(_) | Err(Rejected::Known(_)) => Ok(()),
            Err(r) => Err(r),
        }
    }

    /// Sends a new fee version at the same nonce; `false` if none went out.
    async fn replace(&self, e: &mut Entry, nonce: u64) -> bool {
        let op = e.call.op;
        let Some(old) = e.versions.last().map(|v| v.fees) else {
            return false;
        };
        e.replace_at = Some(Instant::now() + e.policy.replace_after);
        let (base, suggested) = match self.market().await {
            Ok(m) => m,
            Err(f) => {
                warn!(op, ?f, "cannot read the fees; replacing later");
                return false;
            }
        };
        let Some(fees) = fees::bump(old, base, suggested, e.policy.caps) else {
            warn!(
                op,
                nonce,
                max_fee = old.max_fee,
                "stuck at the fee cap; waiting"
            );
            return false;
        };
        match self.broadcast(self.priced(e, nonce, fees), fees).await {
            Ok(v) => {
                info!(op, nonce, old = %e.versions.last().map(|v| v.hash).unwrap_or_default(), tx = %v.hash,
                    max_fee = fees.max_fee, tip = fees.tip, "replaced with higher fees");
                e.status.send_replace(Status::Sent(v.hash));
                e.versions.push(v);
                true
            }
            Err(Rejected::NonceTaken(f) | Rejected::Known(f)) => {
                debug!(op, nonce, %f, "replacement refused (nonce used, or not enough of a bump)");
                false
            }
            Err(Rejected::Underpriced) => {
                debug!(op, nonce, "replacement underpriced; next time");
                false
            }
            Err(Rejected::Insufficient) => {
                warn!(
                    op,
                    nonce, "cannot pay for the replacement; keeping the old fees"
                );
                false
            }
            Err(Rejected::Ambiguous(f)) => {
                warn!(op, nonce, %f, "no answer to the replacement");
                false
            }
            Err(Rejected::Other(f)) => {
                warn!(op, nonce, ?f, "replacement refused");
                false
            }
        }
    }

    /// Follows every sent transaction one step.
    async fn track(&mut self) {
        if self.sent.is_empty() {
            return;
        }
        let sender = self.account.sender;
        let used = self
            .conn
            .try_rpc("eth_getTransactionCount", |p| async move {
                p.get_transaction_count(sender).latest().await
            })
            .await;
        let head = self
            .conn
            .try_rpc(
                "eth_blockNumber",
                |p| async move { p.get_block_number().await },
            )
            .await;
        let (Ok(used), Ok(head)) = (used, head) else {
            return; // Logged by the connection; next tick.
        };
        let mut requeue = Vec::new();
        let nonces: Vec<u64> = self.sent.keys().copied().collect();
        for nonce in nonces {
            let Some(mut e) = self.sent.remove(&nonce) else {
                continue;
            };
            match self.check(&mut e, nonce, used, head).await {
                Check::Keep => {
                    self.sent.insert(nonce, e);
                }
                Check::Done(result) => self.finish(e, result),
                Check::Requeue => requeue.push(e),
            }
        }
        if !requeue.is_empty() {
            self.next_nonce = None;
        }
        for mut e in requeue.into_iter().rev() {
            e.versions.clear();
            e.mined = None;
            e.foreign = 0;
            e.status.send_replace(Status::Queued);
            self.waiting.push_front(e);
        }
    }

    /// The node's view of transaction `hash`: pending or mined, or `None`
    /// if it does not know it.
    async fn transaction(
        &self,
        hash: B256,
    ) -> std::result::Result<Option<alloy::rpc::types::Transaction>, Fault> {
        self.conn
            .try_rpc("eth_getTransactionByHash", |p| async move {
                p.get_transaction_by_hash(hash).await
            })
            .await
    }

    /// Whether the node has the transaction `hash`, pending or mined (an
    /// unanswered question counts as no).
    async fn node_knows(&self, hash: B256) -> bool {
        matches!(self.transaction(hash).await, Ok(Some(_)))
    }

    /// Whether one of `e`'s versions is in a block although no receipt was
    /// found; `None` if the node did not answer.
    async fn ours_without_receipt(&self, e: &Entry) -> Option<bool> {
        for v in e.versions.iter().rev() {
            match self.transaction(v.hash).await {
                Err(_) => return None,
                Ok(Some(tx)) if tx.block_number.is_some() => return Some(true),
                Ok(_) => {}
            }
        }
        Some(false)
    }

    /// One step of a sent transaction at `nonce`, given the account's used nonces and the head.
    async fn check(&self, e: &mut Entry, nonce: u64, used: u64, head: u64) -> Check {
        let op = e.call.op;
        if nonce >= used {
            // Not mined (any more).
            e.foreign = 0;
            if e.mined.take().is_some() {
                warn!(
                    op,
                    nonce, "a reorg removed the transaction's block; tracking it again"
                );
            }
            let Some(latest) = e.versions.last().cloned() else {
                return Check::Requeue;
            };
            let hash = latest.hash;
            match self.transaction(hash).await {
                Err(_) => {}
                Ok(None) => {
                    warn!(op, nonce, tx = %hash, "the transaction left the pool unmined; sending it again");
                    match self.resend(e, nonce, &latest).await {
                        Ok(()) => e.replace_at = Some(Instant::now() + e.policy.replace_after),
                        Err(Rejected::Underpriced) => {
                            self.replace(e, nonce).await;
                        }
                        Err(_) => {} // Logged; next tick.
                    }
                }
                Ok(Some(_)) => {
                    if e.replace_at.is_some_and(|at| Instant::now() >= at) {
                        warn!(op, nonce, tx = %hash, "not mined in time; replacing with higher fees");
                        self.replace(e, nonce).await;
                    }
                }
            }
            return Check::Keep;
        }
        // The nonce is used: by one of our versions, or by another transaction.
        if e.mined.is_none() {
            for v in e.versions.iter().rev() {
                let hash = v.hash;
                let receipt = self
                    .conn
                    .try_rpc("eth_getTransactionReceipt", |p| async move {
                        p.get_transaction_receipt(hash).await
                    })
                    .await;
                match receipt {
                    Err(_) => return Check::Keep,
                    Ok(Some(r)) => {
                        if let (Some(block), Some(block_hash)) = (r.block_number, r.block_hash) {
                            e.mined = Some(Mined {
                                tx: r.transaction_hash,
                                block,
                                block_hash,
                                ok: r.status(),
                                gas_used: r.gas_used,
                            });
                            break;
                        }
                    }
                    Ok(None) => {}
                }
            }
        }
        let Some(m) = e.mined else {
            match self.ours_without_receipt(e).await {
                // The node mined one of our versions but has no receipt
                // for it yet: not another transaction's nonce.
                Some(true) => {
                    debug!(op, nonce, "mined, no receipt yet");
                    e.foreign = 0;
                    return Check::Keep;
                }
                // It did not say: next tick (as for a receipt it did not
                // answer), without counting this one either way.
                None => return Check::Keep,
                Some(false) => {}
            }
            e.foreign += 1;
            if e.foreign < FOREIGN_TICKS {
                return Check::Keep;
            }
            warn!(
                op,
                nonce, "another transaction of the account took the nonce; sending again"
            );
            return Check::Requeue;
        };
        if head < m.block.saturating_add(e.policy.confirmations) {
            return Check::Keep;
        }
        let block = m.block;
        let canonical = self
            .conn
            .try_rpc("eth_getBlockByNumber", |p| async move {
                p.get_block_by_number(BlockNumberOrTag::Number(block)).await
            })
            .await;
        match canonical {
            Err(_) => return Check::Keep,
            Ok(b) if b.as_ref().map(|b| b.header.hash) != Some(m.block_hash) => {
                warn!(
                    op,
                    nonce, block, "the receipt's block is no longer canonical; tracking again"
                );
                e.mined = None;
                return Check::Keep;
            }
            Ok(_) => {}
        }
        if m.ok {
            return Check::Done(Ok(Landed {
                tx: m.tx,
                block: m.block,
                gas_used: m.gas_used,
            }));
        }
        // Reverted once mined: the same call at its block says why.
        let req = self.request(&e.call);
        let rerun = self
            .conn
            .try_rpc("eth_call", |p| async move {
                p.call(req).block(BlockId::number(block)).await
            })
            .await;
        let data = match rerun {
            Err(Fault::Revert(data)) => data,
            Ok(_) | Err(Fault::Rpc(_)) => Bytes::new(),
        };
        Check::Done(Err(Failed::Reverted {
            tx: Some(m.tx),
            data,
        }))
    }
}
