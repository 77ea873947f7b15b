//! The Ethereum backend: [`EthFunder`] and [`EthAdjudicator`] over an alloy
//! websocket provider.
//!
//! Every operation re-reads the on-chain state it depends on (holdings, the
//! dispute, the chain's time) right before acting, and checks what the
//! contract would check, so a doomed transaction is refused with the same
//! typed error as [`SimLedger`](crate::SimLedger) gives, without spending gas.
//! A revert that still happens (a race with another party) is decoded into
//! the same errors.
//!
//! # Reorgs
//! With `confirmations = k`, what the caller acts on only reflects blocks at
//! least `k` deep: [`Adjudicator::dispute`] reads the contract at the block
//! `head - k` (by hash, so both dispute slots come from the same block),
//! funding counts deposits at that block, and the event streams deliver a
//! block's logs only once it is `k` deep (a late subscriber's history too).
//! A reorg shallower than `k` is therefore invisible. A deeper one is
//! detected (the scanner remembers the hashes of the blocks it scanned up
//! to): it rescans from the fork and the streams may get an event again,
//! which the watcher's re-read of the dispute makes harmless. The pre-checks
//! before sending a transaction read the latest block instead, since that is
//! what the transaction will meet.
//!
//! # Events
//! All subscriptions of one [`EthAdjudicator`] and its clones share one
//! scanner task (`scan`): one block subscription and one `eth_getLogs` per
//! scanned range, routed by channel id, so a client watching 10,000 channels
//! costs the node what one channel does; a new subscriber's history comes
//! from one query per 1,000 new channels.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder, WsConnect};
use alloy::rpc::types::Log;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use async_trait::async_trait;
use perun_channel::{ChannelId, Params, State};
use perun_wallet::{Account, LocalAccount};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

mod revert;
mod scan;

use crate::bindings::{
    Adjudicator as AdjContract, AssetHolderETH as Holder, Deployment, TestToken as Token,
};
use crate::eth::scan::Hub;
use crate::types::{WithdrawalAuth, event_channel, withdrawal_hash};
use crate::{
    Adjudicator, AdjudicatorEvent, Dispute, Error, EventStream, Funder, FundingRequest, Result,
    SignedChannel, WithdrawRequest, funding_id,
};
use crate::{BadEventReason, RpcFailure};

/// What an asset holder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// Ether.
    Eth,
    /// An ERC20 token; deposits approve the holder first.
    Erc20 {
        /// The token contract.
        token: Address,
    },
}

/// Where the contracts are and how careful to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthConfig {
    /// The adjudicator contract.
    pub adjudicator: Address,
    /// Every asset holder this backend may deposit to or withdraw from.
    pub assets: HashMap<Address, AssetKind>,
    /// Blocks on top of a block before its events, deposits and dispute count
    /// (0: at once). A reorg shallower than this never reaches the caller.
    pub confirmations: u64,
    /// The first block event subscriptions scan (the deployment block, say).
    pub from_block: u64,
    /// How long to wait for a sent transaction's receipt before giving up.
    pub receipt_timeout: Duration,
}

impl EthConfig {
    /// The configuration for a [`Deployment`], trusting blocks at once.
    pub fn from_deployment(d: &Deployment) -> Self {
        let assets = HashMap::from([
            (d.eth_holder, AssetKind::Eth),
            (d.erc20_holder, AssetKind::Erc20 { token: d.token }),
        ]);
        Self {
            adjudicator: d.adjudicator,
            assets,
            confirmations: 0,
            from_block: 0,
            receipt_timeout: Duration::from_secs(120),
        }
    }
}

/// What both Ethereum handles share: the provider, the sender and the config.
#[derive(Debug, Clone)]
struct Chain {
    provider: DynProvider,
    sender: Address,
    chain_id: U256,
    cfg: Arc<EthConfig>,
}

impl Chain {
    async fn new(provider: DynProvider, sender: Address, cfg: EthConfig) -> Result<Self> {
        let chain_id = provider.get_chain_id().await.map_err(chain)?;
        Ok(Self {
            provider,
            sender,
            chain_id: U256::from(chain_id),
            cfg: Arc::new(cfg),
        })
    }

    async fn connect(url: &str, account: &LocalAccount, cfg: EthConfig) -> Result<Self> {
        let provider = ws_provider(url, account).await?;
        Self::new(provider, account.address(), cfg).await
    }

    fn adjudicator(&self) -> AdjContract::AdjudicatorInstance<DynProvider> {
        AdjContract::new(self.cfg.adjudicator, self.provider.clone())
    }

    /// Every holder shares the ETH holder's interface for deposit, holdings and withdraw.
    fn holder(
        &self,
        holder: Address,
    ) -> Result<(Holder::AssetHolderETHInstance<DynProvider>, AssetKind)> {
        match self.cfg.assets.get(&holder) {
            Some(kind) => Ok((Holder::new(holder, self.provider.clone()), *kind)),
            None => {
                warn!(%holder, "unknown asset holder");
                Err(Error::UnknownAsset(holder))
            }
        }
    }

    /// Same-chain assets with their row index; other chains' assets are not settled here.
    fn local_assets(&self, state: &State) -> Vec<(usize, Address)> {
        state
            .outcome
            .assets
            .iter()
            .enumerate()
            .filter(|(_, a)| a.chainId == self.chain_id)
            .map(|(i, a)| (i, a.holder))
            .collect()
    }

    async fn head(&self) -> Result<u64> {
        self.provider.get_block_number().await.map_err(chain)
    }

    async fn now(&self) -> Result<u64> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(chain)?
            .ok_or(Error::rpc(
                "eth_getBlockByNumber",
                RpcFailure::Node {
                    code: 0,
                    message: "no latest block".into(),
                },
            ))?;
        Ok(block.header.timestamp)
    }

    /// The number and hash of a block, `None` if the chain has no such block (any more).
    async fn block(&self, tag: BlockNumberOrTag) -> Result<Option<(u64, B256)>> {
        let block = self
            .provider
            .get_block_by_number(tag)
            .await
            .map_err(chain)?;
        Ok(block.map(|b| (b.header.number, b.header.hash)))
    }

    /// The block `confirmations` below the head: the newest one a reorg shallower
    /// than the confirmation depth cannot replace.
    async fn confirmed(&self) -> Result<(u64, B256)> {
        // The chain can get shorter between the two reads (a reorg); read the head again.
        let mut n = 0;
        for _ in 0..3 {
            n = self.head().await?.saturating_sub(self.cfg.confirmations);
            if let Some(b) = self.block(BlockNumberOrTag::Number(n)).await? {
                return Ok(b);
            }
            debug!(
                block = n,
                "confirmed block vanished; reading the head again"
            );
        }
        Err(Error::rpc(
            "eth_getBlockByNumber",
            RpcFailure::Node {
                code: 0,
                message: format!("block {n} vanished (reorg)"),
            },
        ))
    }

    /// The latest block, for pre-checks that must see what a transaction will meet.
    async fn latest(&self) -> Result<(u64, B256)> {
        self.block(BlockNumberOrTag::Latest)
            .await?
            .ok_or(Error::rpc(
                "eth_getBlockByNumber",
                RpcFailure::Node {
                    code: 0,
                    message: "no latest block".into(),
                },
            ))
    }

    async fn holdings(&self, holder: Address, fid: B256, at: BlockId) -> Result<(U256, bool)> {
        let (h, _) = self.holder(holder)?;
        let r = h.holdings(fid).block(at).call().await.map_err(chain)?;
        Ok((r.amount, r.settled))
    }

    /// The dispute at the latest block, for the pre-checks before a transaction.
    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        let (_, hash) = self.latest().await?;
        self.dispute_at(id, hash).await
    }

    /// Both dispute slots, read at the same block (by hash: a reorg that
    /// replaces the block makes the read fail instead of mixing two chains).
    async fn dispute_at(&self, id: ChannelId, block: B256) -> Result<Option<Dispute>> {
        let adj = self.adjudicator();
        let at = BlockId::hash_canonical(block);
        let d = adj.disputes(id).block(at).call().await.map_err(chain)?;
        if d.timeout == 0 {
            return Ok(None);
        }
        let state_hash = adj.stateHashes(id).block(at).call().await.map_err(chain)?;
        Ok(Some(Dispute {
            version: d.version,
            timeout: d.timeout,
            concluded: d.concluded,
            state_hash,
        }))
    }

    /// Who has not deposited their share at the confirmed height.
    async fn missing(&self, params: &Params, state: &State) -> Result<Vec<(usize, Address)>> {
        let at = BlockId::hash_canonical(self.confirmed().await?.1);
        let mut missing = Vec::new();
        for (i, p) in params.participants.iter().enumerate() {
            let fid = funding_id(state.channelId, *p);
            for (a, holder) in self.local_assets(state) {
                let need = state.balance(a, i).unwrap_or_default();
                if self.holdings(holder, fid, at).await?.0 < need {
                    missing.push((i, *p));
                    break;
                }
            }
        }
        Ok(missing)
    }
}

/// A websocket provider that signs with `account`.
///
/// Nonces are read from the node for every transaction (alloy's default cache
/// would skip a nonce after a failed submission and leave later transactions stuck).
pub async fn ws_provider(url: &str, account: &LocalAccount) -> Result<DynProvider> {
    let signer = PrivateKeySigner::from_slice(&account.secret_bytes()).map_err(chain)?;
    let provider = ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(EthereumWallet::from(signer))
        .connect_ws(WsConnect::new(url))
        .await
        .map_err(chain)?;
    Ok(provider.erased())
}

/// Sends a prepared contract call and waits for its receipt, decoding reverts.
///
/// The call is simulated first (from the sender), so a revert is reported before
/// any nonce is taken; the receipt wait is bounded by `receipt_timeout`.
macro_rules! send {
    ($chain:expr, $call:expr, $what:literal) => {{
        let call = $call.from($chain.sender);
        call.call_raw().await.map_err(|e| decode_revert(e, $what))?;
        let pending = call.send().await.map_err(|e| decode_revert(e, $what))?;
        let receipt = pending
            .with_required_confirmations($chain.cfg.confirmations.max(1))
            .with_timeout(Some($chain.cfg.receipt_timeout))
            .get_receipt()
            .await
            .map_err(chain)?;
        if !receipt.status() {
            warn!(tx = %receipt.transaction_hash, "{} reverted", $what);
            return Err(Error::Reverted { op: $what, tx: Some(receipt.transaction_hash), reason: crate::RevertReason::Empty });
        }
        debug!(tx = %receipt.transaction_hash, gas = receipt.gas_used, "{} mined", $what);
        receipt
    }};
}

/// Deposits to the asset holders over an alloy provider.
#[derive(Debug, Clone)]
pub struct EthFunder {
    chain: Chain,
}

impl EthFunder {
    /// A funder sending from `sender`, which must be the provider's signing account.
    pub async fn new(provider: DynProvider, sender: Address, cfg: EthConfig) -> Result<Self> {
        Ok(Self {
            chain: Chain::new(provider, sender, cfg).await?,
        })
    }

    /// Connects to a websocket endpoint and sends from `account`.
    pub async fn connect(url: &str, account: &LocalAccount, cfg: EthConfig) -> Result<Self> {
        Ok(Self {
            chain: Chain::connect(url, account, cfg).await?,
        })
    }

    /// Deposits `amount` on top of the `held` it read; the holder refuses it if other holdings meet it.
    async fn deposit(&self, holder: Address, fid: B256, held: U256, amount: U256) -> Result<()> {
        let c = &self.chain;
        let (h, kind) = c.holder(holder)?;
        match kind {
            AssetKind::Eth => {
                let have = c.provider.get_balance(c.sender).await.map_err(chain)?;
                if have < amount {
                    return Err(Error::InsufficientFunds { need: amount, have });
                }
                send!(c, h.deposit(fid, held, amount).value(amount), "deposit");
            }
            AssetKind::Erc20 { token } => {
                let t = Token::new(token, c.provider.clone());
                let have = t.balanceOf(c.sender).call().await.map_err(chain)?;
                if have < amount {
                    return Err(Error::InsufficientFunds { need: amount, have });
                }
                send!(c, t.approve(holder, amount), "approve");
                send!(c, h.deposit(fid, held, amount), "deposit");
            }
        }
        info!(%holder, %amount, "deposited");
        Ok(())
    }
}

#[async_trait]
impl Funder for EthFunder {
    async fn fund(&self, req: FundingRequest) -> Result<()> {
        let span = info_span!("eth_fund", channel = %req.state.channelId, index = req.index);
        async {
            req.check()?;
            let c = &self.chain;
            let me = req.params.participants[req.index];
            let fid = funding_id(req.state.channelId, me);
            // Subscribe first so no deposit between the check and the wait is missed.
            let mut blocks = c.provider.subscribe_blocks().await.map_err(chain)?;
            for (a, holder) in c.local_assets(&req.state) {
                c.holder(holder)?;
                let need = req.state.balance(a, req.index).unwrap_or_default();
                let (held, _) = c.holdings(holder, fid, BlockId::latest()).await?;
                let missing = need.saturating_sub(held);
                if !missing.is_zero() {
                    self.deposit(holder, fid, held, missing).await?;
                }
            }
            let wait = async {
                loop {
                    match c.missing(&req.params, &req.state).await {
                        Ok(missing) if missing.is_empty() => return Ok::<(), Error>(()),
                        Ok(_) => {}
                        // A reorg can replace the block being read; the next block retries.
                        Err(e) => warn!(%e, "reading the deposits failed; retrying"),
                    }
                    next_block(&mut blocks).await?;
                }
            };
            match tokio::time::timeout(req.timeout, wait).await {
                Ok(r) => r,
                Err(_) => {
                    let missing = c.missing(&req.params, &req.state).await?;
                    if missing.is_empty() {
                        return Ok(());
                    }
                    warn!(?missing, "funding timed out");
                    Err(Error::FundingTimeout { missing })
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Registers, concludes and withdraws through the contracts over an alloy provider.
#[derive(Debug, Clone)]
pub struct EthAdjudicator {
    chain: Chain,
    /// The event scanner all subscriptions (of this handle and its clones) share.
    hub: Arc<Hub>,
}

impl EthAdjudicator {
    /// An adjudicator sending from `sender`, which must be the provider's signing account.
    pub async fn new(provider: DynProvider, sender: Address, cfg: EthConfig) -> Result<Self> {
        Ok(Self {
            chain: Chain::new(provider, sender, cfg).await?,
            hub: Arc::default(),
        })
    }

    /// Connects to a websocket endpoint and sends from `account`.
    pub async fn connect(url: &str, account: &LocalAccount, cfg: EthConfig) -> Result<Self> {
        Ok(Self {
            chain: Chain::connect(url, account, cfg).await?,
            hub: Arc::default(),
        })
    }

    /// Whether the shared event scanner runs, as it changes: it starts with
    /// the first subscription and stops once every stream is dropped (or after
    /// a chain error it reported to them).
    pub fn scanner_running(&self) -> watch::Receiver<bool> {
        self.hub.running.subscribe()
    }

    /// The chain id read at construction.
    pub fn chain_id(&self) -> U256 {
        self.chain.chain_id
    }

    /// The holders' `withdraw(auth, sig)` as sent by this backend's account.
    pub async fn withdraw_signed(
        &self,
        holder: Address,
        auth: &WithdrawalAuth,
        sig: &Bytes,
    ) -> Result<()> {
        let c = &self.chain;
        let (h, _) = c.holder(holder)?;
        let call = h.withdraw(
            crate::bindings::eth_holder::AssetHolder::WithdrawalAuth {
                channelId: auth.channelId,
                participant: auth.participant,
                receiver: auth.receiver,
                amount: auth.amount,
            },
            sig.clone(),
        );
        let sent: Result<()> = async {
            send!(c, call, "withdraw");
            Ok(())
        }
        .await;
        sent.map_err(|e| match e {
            Error::PaymentFailed(_) => Error::PaymentFailed(auth.receiver),
            e => e,
        })
    }
}

fn sigs_bytes(req: &SignedChannel) -> Vec<Bytes> {
    req.state
        .sigs
        .iter()
        .map(|s| {
            s.map(|s| Bytes::from(s.as_bytes().to_vec()))
                .unwrap_or_default()
        })
        .collect()
}

#[async_trait]
impl Adjudicator for EthAdjudicator {
    async fn register(&self, req: &SignedChannel) -> Result<()> {
        let state = &req.state.state;
        let span = info_span!("eth_register", channel = %state.channelId, version = state.version);
        async {
            req.check()?;
            let c = &self.chain;
            let dispute = c.dispute(state.channelId).await?;
            if dispute.is_none() && !state.isFinal {
                // The contract's `now + challengeDuration` must fit in 64 bits.
                c.now()
                    .await?
                    .checked_add(req.params.challengeDuration)
                    .ok_or(Error::Overflow)?;
            }
            if let Some(d) = dispute {
                if !d.concluded && d.state_hash == state.hash() {
                    debug!("state registered already; nothing to do");
                    return Ok(());
                }
                if d.concluded {
                    return Err(Error::AlreadyConcluded);
                }
                if c.now().await? >= d.timeout {
                    return Err(Error::TimeoutPassed);
                }
                if state.version <= d.version {
                    return Err(Error::VersionTooLow {
                        registered: d.version,
                        got: state.version,
                    });
                }
            }
            let adj = c.adjudicator();
            let call = adj.register((&req.params).into(), state.into(), sigs_bytes(req));
            let sent: Result<()> = async {
                send!(c, call, "register");
                Ok(())
            }
            .await;
            if let Err(e @ (Error::VersionTooLow { .. } | Error::Reverted { .. })) = sent {
                // Someone else's transaction came first (a revert at simulation or
                // once mined): report what is on-chain now, as the contract's rule.
                return Err(match c.dispute(state.channelId).await? {
                    Some(d) if d.concluded => Error::AlreadyConcluded,
                    Some(d) if d.version >= state.version => Error::VersionTooLow {
                        registered: d.version,
                        got: state.version,
                    },
                    d if matches!(e, Error::VersionTooLow { .. }) => Error::VersionTooLow {
                        registered: d.map_or(0, |d| d.version),
                        got: state.version,
                    },
                    _ => e,
                });
            }
            sent?;
            info!("registered");
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn conclude(&self, req: &SignedChannel) -> Result<()> {
        let state = &req.state.state;
        let span = info_span!("eth_conclude", channel = %state.channelId, version = state.version);
        async {
            let c = &self.chain;
            let adj = c.adjudicator();
            if state.isFinal && req.state.is_fully_signed() {
                req.check()?;
                if c.dispute(state.channelId)
                    .await?
                    .is_some_and(|d| d.concluded)
                {
                    return Err(Error::AlreadyConcluded);
                }
                let call = adj.concludeFinal((&req.params).into(), state.into(), sigs_bytes(req));
                let sent: Result<()> = async {
                    send!(c, call, "concludeFinal");
                    Ok(())
                }
                .await;
                already_concluded(c, state.channelId, sent).await?;
                info!("concluded final state");
                return Ok(());
            }
            req.check_unsigned()?;
            let d = c
                .dispute(state.channelId)
                .await?
                .ok_or(Error::NotRegistered)?;
            if d.concluded {
                return Err(Error::AlreadyConcluded);
            }
            let now = c.now().await?;
            if now < d.timeout {
                return Err(Error::TimeoutNotPassed {
                    timeout: d.timeout,
                    now,
                });
            }
            if state.hash() != d.state_hash {
                warn!("conclude with a state that is not the registered one");
                return Err(Error::WrongState);
            }
            let sent: Result<()> = async {
                send!(
                    c,
                    adj.conclude((&req.params).into(), state.into()),
                    "conclude"
                );
                Ok(())
            }
            .await;
            already_concluded(c, state.channelId, sent).await?;
            info!("concluded");
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()> {
        let span = info_span!("eth_withdraw", channel = %req.state.channelId, index = req.index);
        async {
            let me = req.check()?;
            let c = &self.chain;
            let fid = funding_id(req.state.channelId, me);
            let mut credits = Vec::new();
            for (_, holder) in c.local_assets(&req.state) {
                let (credit, settled) = c.holdings(holder, fid, BlockId::latest()).await?;
                if !settled {
                    return Err(Error::NotConcluded);
                }
                credits.push((holder, credit));
            }
            for (holder, credit) in credits {
                if credit.is_zero() {
                    debug!(%holder, "nothing to withdraw");
                    continue;
                }
                let auth = WithdrawalAuth {
                    channelId: req.state.channelId,
                    participant: me,
                    receiver: req.receiver,
                    amount: credit,
                };
                // The participant sending itself needs no signature.
                let sig = if c.sender == me {
                    Bytes::new()
                } else {
                    let hash = withdrawal_hash(holder, c.chain_id, &auth);
                    let sig = req.account.sign_hash(hash)?;
                    Bytes::from(sig.as_bytes().to_vec())
                };
                self.withdraw_signed(holder, &auth, &sig).await?;
                info!(%holder, %credit, "withdrawn");
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Joins the adjudicator's one event scanner (started here if it is not
    /// running): the channel's past events come first, then live ones.
    async fn subscribe(&self, id: ChannelId) -> Result<EventStream> {
        let c = &self.chain;
        // Starting the scanner needs a block subscription; taking it here reports
        // an unreachable node to the caller, as a failed subscription. One
        // caller of a burst takes it, the others find the scanner running.
        let mut blocks = None;
        let _starting = if self.hub.is_running() {
            None
        } else {
            let gate = self.hub.starting.lock().await;
            if !self.hub.is_running() {
                blocks = Some(c.provider.subscribe_blocks().await.map_err(chain)?);
            }
            Some(gate)
        };
        let (tx, rx) = event_channel(Some(self.hub.streams.clone()));
        if let Some(generation) = self.hub.join(id, tx) {
            scan::spawn(c.clone(), self.hub.clone(), generation, blocks);
        }
        debug!(channel = %id, "subscribed");
        Ok(rx)
    }

    /// The dispute at the confirmed block (`confirmations` below the head), so a
    /// registration that a shallow reorg drops is never reported.
    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        let (number, hash) = self.chain.confirmed().await?;
        debug!(channel = %id, block = number, "reading the confirmed dispute");
        self.chain.dispute_at(id, hash).await
    }
}

/// Waits for the next block header. Missed headers do not matter (every wake-up
/// re-reads the chain), so a lagging subscription just continues.
async fn next_block(
    sub: &mut alloy::pubsub::Subscription<alloy::rpc::types::Header>,
) -> Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match sub.recv().await {
            Ok(_) => return Ok(()),
            Err(RecvError::Lagged(n)) => debug!(n, "block subscription lagged"),
            Err(RecvError::Closed) => {
                return Err(Error::rpc("eth_subscribe", RpcFailure::Disconnected));
            }
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
    let event = if log.address() == cfg.adjudicator
        && topic0 == AdjContract::Registered::SIGNATURE_HASH
    {
        let e = AdjContract::Registered::decode_log(&log.inner)
            .map_err(bad)?
            .data;
        let state: State = e.state.into();
        if e.channelId != id || state.channelId != id {
            return Err(Error::BadEvent {
                address: log.address(),
                topic: topic0,
                reason: BadEventReason::OtherChannel(e.channelId),
            });
        }
        AdjudicatorEvent::Registered {
            id,
            version: e.version,
            timeout: e.timeout,
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

/// A conclusion that reverted once mined lost a race with someone else's:
/// report that as [`Error::AlreadyConcluded`] if the chain now says so.
async fn already_concluded(c: &Chain, id: ChannelId, sent: Result<()>) -> Result<()> {
    match sent {
        Err(e @ Error::Reverted { .. }) => match c.dispute(id).await? {
            Some(d) if d.concluded => Err(Error::AlreadyConcluded),
            _ => Err(e),
        },
        other => other,
    }
}

fn chain(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::rpc("rpc", RpcFailure::Transport(std::sync::Arc::new(e)))
}

/// Maps a contract revert to the error the simulated ledger gives for the
/// same rule, with the contract error's arguments.
fn decode_revert(e: alloy::contract::Error, what: &str) -> Error {
    match e.as_revert_data() {
        Some(data) => revert::decode(what_static(what), None, &data),
        None => chain(e),
    }
}

/// The static name of a call (the `send!` macro's literals).
fn what_static(what: &str) -> &'static str {
    match what {
        "register" => "register",
        "conclude" => "conclude",
        "concludeFinal" => "concludeFinal",
        "deposit" => "deposit",
        "approve" => "approve",
        "withdraw" => "withdraw",
        _ => "transaction",
    }
}
