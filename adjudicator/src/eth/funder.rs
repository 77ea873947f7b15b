//! [`EthFunder`]: deposits that cannot overpay.
//!
//! Per asset, funding reads what the slot holds, deposits exactly what is
//! missing and names what it read (`deposit(fid, expectedHeld, amount)`); the
//! holder refuses it with `HoldingsChanged` if anything else landed first,
//! and funding reads again. Together with the queue's dedupe key (holder and
//! slot), a deposit is never sent twice for one slot: a retry after a receipt
//! timeout joins the deposit in flight, and a deposit left in the pool by an
//! earlier process makes the new one revert instead of landing twice.

use std::time::Duration;

use alloy::eips::BlockId;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::sol_types::SolCall;
use async_trait::async_trait;
use perun_wallet::LocalAccount;
use tracing::{Instrument, info, info_span, warn};

use super::conn::Heads;
use super::txqueue::Call;
use super::{AssetKind, Chain, EthConfig, dedupe_key};
use crate::bindings::{AssetHolderETH as Holder, TestToken as Token};
use crate::{Error, Funder, FundingRequest, Result, RevertReason, funding_id};

/// How often funding reads the holdings again after another deposit for
/// the same slot came first, before it reports `HoldingsChanged`.
const DEPOSIT_ROUNDS: usize = 8;
/// How often the funding wait polls without block headers.
const POLL: Duration = Duration::from_secs(2);

/// Deposits to the asset holders over an alloy provider.
#[derive(Debug, Clone)]
pub struct EthFunder {
    chain: Chain,
}

impl EthFunder {
    /// A funder sending from `sender`, which must be the provider's signing
    /// account. Its provider cannot be rebuilt if it dies (see [`connect`](Self::connect)).
    /// Fails with [`Error::HolderNotBound`] if a configured holder is not bound to the
    /// configured adjudicator.
    pub async fn new(provider: DynProvider, sender: Address, cfg: EthConfig) -> Result<Self> {
        let chain = Chain::new(provider, sender, cfg).await?;
        chain.check_holders().await?;
        Ok(Self { chain })
    }

    /// Connects to a websocket endpoint and sends from `account`; a lost
    /// connection is rebuilt from the URL. Checks the holders as [`new`](Self::new) does.
    pub async fn connect(url: &str, account: &LocalAccount, cfg: EthConfig) -> Result<Self> {
        let chain = Chain::connect(url, account, cfg).await?;
        chain.check_holders().await?;
        Ok(Self { chain })
    }

    /// Brings the slot's holdings at `holder` up to `need`, reading them
    /// again whenever another deposit came first.
    async fn fund_asset(
        &self,
        holder: Address,
        kind: AssetKind,
        slot: Slot,
        need: U256,
    ) -> Result<()> {
        let mut last = None;
        for _ in 0..DEPOSIT_ROUNDS {
            let (held, settled) = self
                .chain
                .holdings(holder, slot.channel, slot.participant, BlockId::latest())
                .await?;
            if settled {
                // The channel was concluded (its funding failed, and a peer
                // closed it with version 0): a deposit now would sit there
                // as a credit nobody watches.
                warn!(%holder, "the channel is concluded already; not depositing");
                return Err(Error::AlreadyConcluded);
            }
            if held >= need {
                return Ok(());
            }
            match self.deposit(holder, kind, slot, held, need - held).await {
                Ok(()) => {}
                Err(e @ Error::HoldingsChanged { .. }) => {
                    warn!(%e, "another deposit for the slot came first; reading the holdings again");
                    last = Some(e);
                }
                Err(Error::Reverted {
                    reason:
                        RevertReason::Custom {
                            name: "ERC20InsufficientAllowance",
                            ..
                        },
                    ..
                }) => {
                    // Another approval of the holder (for another channel) replaced ours.
                    warn!(%holder, "the token allowance changed under the deposit; approving again");
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::HoldingsChanged {
            funding_id: slot.fid(),
            expected: need,
            found: None,
        }))
    }

    /// Deposits `amount` on top of the `held` it read, through the queue.
    async fn deposit(
        &self,
        holder: Address,
        kind: AssetKind,
        slot: Slot,
        held: U256,
        amount: U256,
    ) -> Result<()> {
        let c = &self.chain;
        let sender = c.sender;
        let fid = slot.fid();
        let input: Bytes = match kind {
            // Ether's own entry point: the amount is the value sent.
            AssetKind::Eth => Holder::depositEthCall {
                channelId: slot.channel,
                participant: slot.participant,
                expectedHeld: held,
            }
            .abi_encode()
            .into(),
            AssetKind::Erc20 { .. } => Holder::depositCall {
                channelId: slot.channel,
                participant: slot.participant,
                expectedHeld: held,
                amount,
            }
            .abi_encode()
            .into(),
        };
        let key = Some(dedupe_key("deposit", &[holder.as_slice(), fid.as_slice()]));
        let value = match kind {
            AssetKind::Eth => {
                let have = c
                    .conn
                    .rpc(
                        "eth_getBalance",
                        |p| async move { p.get_balance(sender).await },
                    )
                    .await?;
                if have < amount {
                    warn!(need = %amount, %have, "not enough ether to deposit");
                    return Err(Error::InsufficientFunds { need: amount, have });
                }
                amount
            }
            AssetKind::Erc20 { token } => {
                let have = c
                    .conn
                    .rpc("balanceOf", |p| async move {
                        Token::new(token, p).balanceOf(sender).call().await
                    })
                    .await?;
                if have < amount {
                    warn!(need = %amount, %have, "not enough tokens to deposit");
                    return Err(Error::InsufficientFunds { need: amount, have });
                }
                let allowed = c
                    .conn
                    .rpc("allowance", |p| async move {
                        Token::new(token, p).allowance(sender, holder).call().await
                    })
                    .await?;
                if allowed < amount {
                    let approve = Call {
                        op: "approve",
                        to: token,
                        input: Token::approveCall {
                            spender: holder,
                            value: amount,
                        }
                        .abi_encode()
                        .into(),
                        value: U256::ZERO,
                        key: Some(dedupe_key("approve", &[holder.as_slice(), fid.as_slice()])),
                    };
                    c.send(approve).await?;
                }
                U256::ZERO
            }
        };
        let landed = c
            .send(Call {
                op: "deposit",
                to: holder,
                input,
                value,
                key,
            })
            .await?;
        info!(%holder, %amount, tx = %landed.tx, "deposited");
        Ok(())
    }
}

/// A participant's deposit slot in a channel.
#[derive(Debug, Clone, Copy)]
struct Slot {
    channel: B256,
    participant: Address,
}

impl Slot {
    fn fid(&self) -> B256 {
        funding_id(self.channel, self.participant)
    }
}

#[async_trait]
impl Funder for EthFunder {
    /// Exactly the configured holders on this backend's chain.
    fn supports(&self, asset: &perun_channel::Asset) -> bool {
        asset.chainId == self.chain.chain_id && self.chain.cfg.assets.contains_key(&asset.holder)
    }

    async fn fund(&self, req: FundingRequest) -> Result<()> {
        let span = info_span!("eth_fund", channel = %req.state.channelId, index = req.index);
        async {
            req.check(self.chain.domain())?;
            let c = &self.chain;
            let me = req.params.participants[req.index];
            let slot = Slot {
                channel: req.state.channelId,
                participant: me,
            };
            // Every holder first: an unknown one fails before any money moves.
            let assets = c
                .local_assets(&req.state)
                .into_iter()
                .map(|(a, holder)| Ok((a, holder, c.holder(holder)?)))
                .collect::<Result<Vec<_>>>()?;
            let mut heads = Heads::new(c.conn.clone(), POLL);
            heads.ensure().await;
            for (a, holder, kind) in assets {
                let need = req.params.funding_of(a, req.index);
                if !need.is_zero() {
                    self.fund_asset(holder, kind, slot, need).await?;
                }
            }
            let wait = async {
                loop {
                    match c.missing(&req.params, &req.state).await {
                        Ok(missing) if missing.is_empty() => return,
                        Ok(_) => {}
                        // A reorg can replace the block being read; the next block retries.
                        Err(e) => warn!(%e, "reading the deposits failed; retrying"),
                    }
                    heads.next().await;
                }
            };
            if tokio::time::timeout(req.timeout, wait).await.is_ok() {
                return Ok(());
            }
            let missing = c.missing(&req.params, &req.state).await?;
            if missing.is_empty() {
                return Ok(());
            }
            warn!(?missing, "funding timed out");
            Err(Error::FundingTimeout { missing })
        }
        .instrument(span)
        .await
    }
}
