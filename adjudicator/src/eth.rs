//! The Ethereum backend: [`EthFunder`] and [`EthAdjudicator`] over an alloy
//! websocket provider.
//!
//! Every operation re-reads the on-chain state it depends on (holdings, the
//! dispute, the chain's time) right before acting, and checks what the
//! contract would check, so a doomed transaction is refused with the same
//! typed error as [`SimLedger`](crate::SimLedger) gives, without spending gas.
//! A revert that still happens (a race with another party) is decoded into
//! the same errors, with the contract error's arguments.
//!
//! # Transactions
//! Every transaction of an account goes through the account's one queue in
//! the process (`txqueue`), shared by all funders and adjudicators built for
//! that account and chain. It guarantees the following, assuming the node
//! keeps a transaction pool (as geth, reth and anvil do), the account's
//! transactions pending when the queue starts belong to no one who stalls
//! them (their nonces come first), and another sender of the same account
//! (a wallet, another process) is an exception rather than the rule (the
//! queue recovers from it, at the price of re-sending):
//! - **Ordering**: nonces are assigned by one task in the order requests
//!   arrive; a submission the node refuses does not use a nonce, so no gap
//!   blocks later transactions. A nonce another transaction of the account
//!   took anyway is noticed, and the request is sent again with a new one.
//! - **Simulation first**: each request is run with `eth_call` from the
//!   sender before it is signed; a revert is reported, typed, without gas.
//! - **Fee cap**: the tip is the node's suggestion but at most
//!   [`EthConfig::max_priority_fee_per_gas`], the max fee `2 * base + tip` but
//!   at most [`EthConfig::max_fee_per_gas`]. Tips a cheater pays (which raise
//!   the node's suggestion) cannot push ours above the cap; if even the base
//!   fee is above it, the caller gets [`Error::FeeCapExceeded`] and the
//!   request waits in the queue instead of overpaying.
//! - **Replacement**: a transaction not mined after
//!   [`EthConfig::replace_after`] is replaced at the same nonce with both fees
//!   up by at least an eighth (within the caps); one that left the pool is
//!   sent again; whichever fee version is mined is the result.
//! - **Confirmation**: a result counts once its block is
//!   [`EthConfig::confirmations`] deep and still canonical; a reorg that drops
//!   it puts the transaction back into tracking.
//! - **Dedupe**: a deposit (per holder and funding slot), a registration or a
//!   conclusion (per channel and state) that is in flight already is joined,
//!   not sent again: retries after a [`Error::ReceiptTimeout`] cost nothing.
//!   The contracts make the rest safe: a deposit names the holdings it
//!   expects (`HoldingsChanged` otherwise), a registration a higher version.
//!
//! A caller waits at most [`EthConfig::receipt_timeout`]; the queue keeps the
//! transaction going after that, until it lands or is moot.
//!
//! # Connection
//! Every call to the node is bounded by [`EthConfig::rpc_timeout`] and fails
//! as [`Error::Rpc`] with a typed [`RpcFailure`]. A
//! backend made with `connect` keeps the URL and the key and builds a new
//! provider once alloy's websocket service gave up reconnecting; one made
//! with `new(provider, ..)` cannot, and fails until its provider recovers.
//!
//! # Reorgs
//! With `confirmations = k`, what the caller acts on only reflects blocks at
//! least `k` deep: [`Adjudicator::dispute`](crate::Adjudicator::dispute) reads the contract at the block
//! `head - k` (by hash, so both dispute slots come from the same block),
//! funding counts deposits at that block, transactions count once `k` deep,
//! and the event streams deliver a block's logs only once it is `k` deep (a
//! late subscriber's history too). A reorg shallower than `k` is therefore
//! invisible. A deeper one is detected (the scanner remembers the hashes of
//! the blocks it scanned up to): it rescans from the fork and the streams may
//! get an event again, which the watcher's re-read of the dispute makes
//! harmless. The pre-checks before sending a transaction read the latest
//! block instead, since that is what the transaction will meet.
//!
//! # Events
//! All subscriptions of one [`EthAdjudicator`] and its clones share one
//! scanner task (`scan`): one block subscription and one `eth_getLogs` per
//! scanned range, routed by channel id, so a client watching 10,000 channels
//! costs the node what one channel does; a new subscriber's history comes
//! from one query per 1,000 new channels. The scanner outlives node failures:
//! it backs off, reconnects and continues from where it was.
//! [`EthAdjudicator::registrations`] follows every dispute on the
//! adjudicator instead (a watchtower's view): one query per block range,
//! whichever channels, from a cursor the caller keeps (`feed`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::providers::{DynProvider, Provider};
use alloy::signers::local::PrivateKeySigner;
use perun_channel::{ChannelId, Domain, Params, State};
use perun_wallet::{Account, LocalAccount};
use tracing::{debug, warn};

mod adjudicator;
mod conn;
pub(crate) mod feed;
mod fees;
mod funder;
mod history;
mod revert;
mod scan;
pub(crate) mod txqueue;

pub use adjudicator::EthAdjudicator;
pub use funder::EthFunder;
pub use revert::tictactoe_reason;

use crate::bindings::{Adjudicator as AdjContract, AssetHolderETH as Holder, Deployment};
use crate::eth::conn::{Conn, IntoFault};
use crate::eth::txqueue::{Call, Landed, Policy, TxQueue};
use crate::{Dispute, Error, Result, RpcFailure};

/// One gwei in wei.
const GWEI: u128 = 1_000_000_000;

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
///
/// The defaults ([`EthConfig::new`]) suit a public chain with 12-second
/// blocks; tests shorten the timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthConfig {
    /// The adjudicator contract.
    pub adjudicator: Address,
    /// Every asset holder this backend may deposit to or withdraw from.
    pub assets: HashMap<Address, AssetKind>,
    /// Blocks on top of a block before its events, deposits, dispute and
    /// transaction receipts count (0: at once). A reorg shallower than this
    /// never reaches the caller. `None` (the default) picks by the chain's
    /// id at connect time ([`EthConfig::default_confirmations`]): 0 on a
    /// local development chain, where blocks come only with transactions,
    /// and [`DEFAULT_CONFIRMATIONS`](Self::DEFAULT_CONFIRMATIONS) on any
    /// other chain.
    pub confirmations: Option<u64>,
    /// The first block event subscriptions scan: the deployment block (a
    /// real chain must not be scanned from block 0).
    pub from_block: u64,
    /// How long a caller waits for a sent transaction's receipt (the queue
    /// keeps the transaction going after that). Default 120 s.
    pub receipt_timeout: Duration,
    /// The most this backend pays per gas, base fee and tip together
    /// (`maxFeePerGas`). Default 200 gwei: far above a normal base fee, low
    /// enough that a cheater flooding blocks cannot drain the account. A
    /// dispute must land before its timeout, so a challenge duration must
    /// leave room for a fee spike to pass.
    pub max_fee_per_gas: u128,
    /// The most this backend tips per gas (`maxPriorityFeePerGas`), however
    /// high the node's suggestion. Default 3 gwei.
    pub max_priority_fee_per_gas: u128,
    /// How long a transaction may stay unmined before it is replaced with
    /// higher fees (each replacement offers an eighth more). Default 60 s
    /// (five blocks).
    pub replace_after: Duration,
    /// How long any one call to the node may take before it counts as
    /// failed ([`RpcFailure::Timeout`]). Default 20 s.
    pub rpc_timeout: Duration,
    /// The most blocks one `eth_getLogs` of the channel event scanner
    /// covers (halved after a failed round, grown back after successes).
    /// Nodes refuse wide ranges (hosted ones at 1,000 to 10,000 blocks); a
    /// node without a limit reads a new channel's history in fewer rounds
    /// with a larger one. Default 2,000.
    pub log_range: u64,
}

impl EthConfig {
    /// Confirmations on a real chain unless set: a block three deep on
    /// Ethereum has not been reorged out since the merge.
    pub const DEFAULT_CONFIRMATIONS: u64 = 3;
    /// Chain ids of local development nodes (anvil and hardhat: 31337,
    /// ganache and geth `--dev`: 1337), which default to 0 confirmations.
    pub const DEV_CHAIN_IDS: [u64; 2] = [31337, 1337];

    /// The confirmation depth used on chain `chain_id` when
    /// [`confirmations`](Self::confirmations) is `None`.
    pub fn default_confirmations(chain_id: u64) -> u64 {
        if Self::DEV_CHAIN_IDS.contains(&chain_id) {
            0
        } else {
            Self::DEFAULT_CONFIRMATIONS
        }
    }

    /// The confirmation depth in force (after connect it is always set).
    pub(crate) fn depth(&self) -> u64 {
        self.confirmations.unwrap_or(Self::DEFAULT_CONFIRMATIONS)
    }

    /// Default [`receipt_timeout`](Self::receipt_timeout).
    pub const DEFAULT_RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);
    /// Default [`max_fee_per_gas`](Self::max_fee_per_gas).
    pub const DEFAULT_MAX_FEE_PER_GAS: u128 = 200 * GWEI;
    /// Default [`max_priority_fee_per_gas`](Self::max_priority_fee_per_gas).
    pub const DEFAULT_MAX_PRIORITY_FEE_PER_GAS: u128 = 3 * GWEI;
    /// Default [`replace_after`](Self::replace_after).
    pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(60);
    /// Default [`rpc_timeout`](Self::rpc_timeout).
    pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(20);
    /// Default [`log_range`](Self::log_range).
    pub const DEFAULT_LOG_RANGE: u64 = 2_000;

    /// A configuration for the adjudicator deployed in block `from_block`
    /// and the asset holders you use (an ether-only deployment lists just
    /// its ether holder), with the defaults above.
    pub fn new(
        adjudicator: Address,
        from_block: u64,
        assets: impl IntoIterator<Item = (Address, AssetKind)>,
    ) -> Self {
        Self {
            adjudicator,
            assets: assets.into_iter().collect(),
            confirmations: None,
            from_block,
            receipt_timeout: Self::DEFAULT_RECEIPT_TIMEOUT,
            max_fee_per_gas: Self::DEFAULT_MAX_FEE_PER_GAS,
            max_priority_fee_per_gas: Self::DEFAULT_MAX_PRIORITY_FEE_PER_GAS,
            replace_after: Self::DEFAULT_REPLACE_AFTER,
            rpc_timeout: Self::DEFAULT_RPC_TIMEOUT,
            log_range: Self::DEFAULT_LOG_RANGE,
        }
    }

    /// The configuration for a [`deploy`](crate::deploy)ed set of contracts
    /// (both holders), scanning from its deployment block.
    pub fn from_deployment(d: &Deployment) -> Self {
        Self::new(
            d.adjudicator,
            d.block,
            [
                (d.eth_holder, AssetKind::Eth),
                (d.erc20_holder, AssetKind::Erc20 { token: d.token }),
            ],
        )
    }
}

/// A log filter for `events` of the deployment's contracts: the
/// adjudicator and every configured holder.
pub(crate) fn deployment_filter(
    cfg: &EthConfig,
    events: Vec<alloy::primitives::B256>,
) -> alloy::rpc::types::Filter {
    alloy::rpc::types::Filter::new()
        .address(
            std::iter::once(cfg.adjudicator)
                .chain(cfg.assets.keys().copied())
                .collect::<Vec<_>>(),
        )
        .event_signature(events)
}

/// A websocket provider that signs with `account` (for deployment and
/// direct contract calls; the backends send through their transaction queue).
pub async fn ws_provider(url: &str, account: &LocalAccount) -> Result<DynProvider> {
    conn::build(url, wallet(account)?)
        .await
        .map_err(|e| Error::rpc("connect", conn::classify(e).0))
}

fn wallet(account: &LocalAccount) -> Result<EthereumWallet> {
    let signer = PrivateKeySigner::from_slice(&account.secret_bytes())
        .map_err(|e| Error::rpc("connect", RpcFailure::Transport(Arc::new(e))))?;
    Ok(EthereumWallet::from(signer))
}

/// A failed contract call as the crate's error (for `deploy`).
pub(crate) fn contract_error(op: &'static str, e: alloy::contract::Error) -> Error {
    e.into_fault().0.into_error(op, None)
}

/// A dedupe key for the transaction queue: a tag and fixed-width fields.
fn dedupe_key(tag: &str, parts: &[&[u8]]) -> B256 {
    let mut buf = tag.as_bytes().to_vec();
    for p in parts {
        buf.extend_from_slice(p);
    }
    keccak256(buf)
}

/// What both Ethereum handles share: the connection, the sender, the config
/// and the account's transaction queue.
#[derive(Debug, Clone)]
struct Chain {
    conn: Arc<Conn>,
    sender: Address,
    chain_id: U256,
    cfg: Arc<EthConfig>,
    queue: Arc<TxQueue>,
}

impl Chain {
    async fn new(provider: DynProvider, sender: Address, cfg: EthConfig) -> Result<Self> {
        let conn = Arc::new(Conn::new(provider, cfg.rpc_timeout));
        Self::with(conn, sender, cfg).await
    }

    async fn connect(url: &str, account: &LocalAccount, cfg: EthConfig) -> Result<Self> {
        let conn = Arc::new(Conn::connect(url, wallet(account)?, cfg.rpc_timeout).await?);
        Self::with(conn, account.address(), cfg).await
    }

    async fn with(conn: Arc<Conn>, sender: Address, mut cfg: EthConfig) -> Result<Self> {
        let chain_id = conn
            .rpc("eth_chainId", |p| async move { p.get_chain_id().await })
            .await?;
        let depth = *cfg
            .confirmations
            .get_or_insert_with(|| EthConfig::default_confirmations(chain_id));
        debug!(chain_id, confirmations = depth, "connected");
        conn.set_chain_id(chain_id);
        let queue = TxQueue::shared(&conn, chain_id, sender);
        Ok(Self {
            conn,
            sender,
            chain_id: U256::from(chain_id),
            cfg: Arc::new(cfg),
            queue,
        })
    }

    /// The deployment this backend settles on.
    fn domain(&self) -> Domain {
        Domain {
            chain_id: self.chain_id,
            adjudicator: self.cfg.adjudicator,
        }
    }

    /// Checks that every configured holder's `adjudicator()` is the configured adjudicator:
    /// deposits at a holder of another deployment (or at an address without code) could never
    /// be paid out through ours.
    async fn check_holders(&self) -> Result<()> {
        let adjudicator = self.cfg.adjudicator;
        for holder in self.cfg.assets.keys().copied() {
            let bound = self
                .conn
                .rpc("adjudicator", |p| async move {
                    Holder::new(holder, p).adjudicator().call().await
                })
                .await;
            let bound = match bound {
                Ok(a) => Some(a),
                // A call that decodes to nothing: no code there, or not a holder.
                Err(Error::Rpc {
                    source: RpcFailure::Decode(_),
                    ..
                })
                | Err(Error::Reverted { .. }) => None,
                Err(e) => return Err(e),
            };
            if bound != Some(adjudicator) {
                warn!(%holder, ?bound, %adjudicator, "asset holder of another deployment");
                return Err(Error::HolderNotBound {
                    holder,
                    bound,
                    adjudicator,
                });
            }
        }
        Ok(())
    }

    /// Sends a call through the account's queue and waits for it (at most `receipt_timeout`).
    async fn send(&self, call: Call) -> Result<Landed> {
        self.queue
            .send(call, Policy::of(&self.cfg), self.cfg.receipt_timeout)
            .await
    }

    /// What a holder holds; an unknown one is an error.
    fn holder(&self, holder: Address) -> Result<AssetKind> {
        match self.cfg.assets.get(&holder) {
            Some(kind) => Ok(*kind),
            None => {
                warn!(%holder, "unknown asset holder");
                Err(Error::UnknownAsset(holder))
            }
        }
    }

    /// The assets with their row index (checked requests name this chain only: `ForeignAsset`).
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
        self.conn
            .rpc(
                "eth_blockNumber",
                |p| async move { p.get_block_number().await },
            )
            .await
    }

    /// The number, hash and time of a block, `None` if the chain has no such block (any more).
    async fn block(&self, tag: BlockNumberOrTag) -> Result<Option<(u64, B256, u64)>> {
        let block = self
            .conn
            .rpc("eth_getBlockByNumber", |p| async move {
                p.get_block_by_number(tag).await
            })
            .await?;
        Ok(block.map(|b| (b.header.number, b.header.hash, b.header.timestamp)))
    }

    /// The latest block, for pre-checks that must see what a transaction will meet.
    async fn latest(&self) -> Result<(u64, B256, u64)> {
        self.block(BlockNumberOrTag::Latest)
            .await?
            .ok_or(Error::rpc(
                "eth_getBlockByNumber",
                RpcFailure::Missing("the latest block"),
            ))
    }

    /// The latest block's time.
    async fn now(&self) -> Result<u64> {
        Ok(self.latest().await?.2)
    }

    /// The block `confirmations` below the head: the newest one a reorg shallower
    /// than the confirmation depth cannot replace.
    async fn confirmed(&self) -> Result<(u64, B256)> {
        // The chain can get shorter between the two reads (a reorg); read the head again.
        for _ in 0..3 {
            let n = self.head().await?.saturating_sub(self.cfg.depth());
            if let Some((n, hash, _)) = self.block(BlockNumberOrTag::Number(n)).await? {
                return Ok((n, hash));
            }
            debug!(
                block = n,
                "confirmed block vanished; reading the head again"
            );
        }
        Err(Error::rpc(
            "eth_getBlockByNumber",
            RpcFailure::Missing("the confirmed block (it vanished in a reorg)"),
        ))
    }

    /// What `holder` holds for `participant` in `channel`, and whether the channel is
    /// concluded (then it is the participant's withdrawable credit).
    async fn holdings(
        &self,
        holder: Address,
        channel: B256,
        participant: Address,
        at: BlockId,
    ) -> Result<(U256, bool)> {
        self.holder(holder)?;
        let r = self
            .conn
            .rpc("holdings", |p| async move {
                Holder::new(holder, p)
                    .holdings(channel, participant)
                    .block(at)
                    .call()
                    .await
            })
            .await?;
        Ok((r.amount, r.settled))
    }

    /// The participant's current withdrawal nonce at `holder` (latest block: what a signed
    /// authorisation will meet).
    async fn withdraw_nonce(&self, holder: Address, participant: Address) -> Result<U256> {
        self.holder(holder)?;
        self.conn
            .rpc("withdrawNonces", |p| async move {
                Holder::new(holder, p)
                    .withdrawNonces(participant)
                    .call()
                    .await
            })
            .await
    }

    /// The dispute at the latest block, for the pre-checks before a transaction.
    async fn dispute(&self, id: ChannelId) -> Result<Option<Dispute>> {
        let (_, hash, _) = self.latest().await?;
        self.dispute_at(id, hash).await
    }

    /// Both dispute slots, read at the same block (by hash: a reorg that
    /// replaces the block makes the read fail instead of mixing two chains).
    async fn dispute_at(&self, id: ChannelId, block: B256) -> Result<Option<Dispute>> {
        let at = BlockId::hash_canonical(block);
        let adjudicator = self.cfg.adjudicator;
        let d = self
            .conn
            .rpc("disputes", |p| async move {
                AdjContract::new(adjudicator, p)
                    .disputes(id)
                    .block(at)
                    .call()
                    .await
            })
            .await?;
        if d.timeout == 0 {
            return Ok(None);
        }
        let state_hash = self
            .conn
            .rpc("stateHashes", |p| async move {
                AdjContract::new(adjudicator, p)
                    .stateHashes(id)
                    .block(at)
                    .call()
                    .await
            })
            .await?;
        Ok(Some(Dispute {
            version: d.version,
            timeout: d.timeout,
            // The contract's `Phase`: Open, Concluded, Progressed.
            concluded: d.phase == 1,
            state_hash,
            progressed: d.phase == 2,
        }))
    }

    /// Who has not deposited their funding at the confirmed height.
    async fn missing(&self, params: &Params, state: &State) -> Result<Vec<(usize, Address)>> {
        let at = BlockId::hash_canonical(self.confirmed().await?.1);
        let mut missing = Vec::new();
        for (i, p) in params.participants.iter().enumerate() {
            for (a, holder) in self.local_assets(state) {
                let need = params.funding_of(a, i);
                if self.holdings(holder, state.channelId, *p, at).await?.0 < need {
                    missing.push((i, *p));
                    break;
                }
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::EthConfig;

    #[test]
    fn real_chains_default_to_confirmations_and_dev_chains_to_none() {
        assert_eq!(EthConfig::default_confirmations(1), 3);
        assert_eq!(EthConfig::default_confirmations(11155111), 3);
        assert_eq!(EthConfig::default_confirmations(31337), 0);
        assert_eq!(EthConfig::default_confirmations(1337), 0);
        assert_eq!(
            EthConfig::new(super::Address::ZERO, 0, []).confirmations,
            None
        );
    }
}
