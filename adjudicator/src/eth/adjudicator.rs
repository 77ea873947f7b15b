//! [`EthAdjudicator`]: disputes, conclusion and withdrawal through the
//! contracts, and the channel event streams.

use std::sync::Arc;

use alloy::eips::BlockId;
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::DynProvider;
use alloy::sol_types::SolCall;
use async_trait::async_trait;
use perun_channel::{ChannelId, Domain};
use perun_wallet::LocalAccount;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::feed;
use super::scan::{self, Closer, Hub};
use super::txqueue::Call;
use super::{AdjContract, Chain, EthConfig, Holder, dedupe_key};
use crate::types::{WithdrawalAuth, event_channel, withdrawal_hash};
use crate::{
    Adjudicator, Dispute, Error, EventStream, ProgressRequest, RegistrationFeed, Result,
    SignedChannel, WithdrawRequest,
};

/// Registers, concludes and withdraws through the contracts over an alloy provider.
#[derive(Debug, Clone)]
pub struct EthAdjudicator {
    chain: Chain,
    /// The event scanner all subscriptions (of this handle and its clones) share.
    hub: Arc<Hub>,
    /// Ends the scanner and its streams when the last clone is dropped.
    _closer: Arc<Closer>,
}

impl EthAdjudicator {
    /// An adjudicator sending from `sender`, which must be the provider's
    /// signing account. Its provider cannot be rebuilt if it dies (alloy's
    /// own reconnects aside); [`connect`](Self::connect) can.
    pub async fn new(provider: DynProvider, sender: Address, cfg: EthConfig) -> Result<Self> {
        Ok(Self::with(Chain::new(provider, sender, cfg).await?))
    }

    /// Connects to a websocket endpoint and sends from `account`; a lost
    /// connection is rebuilt from the URL.
    pub async fn connect(url: &str, account: &LocalAccount, cfg: EthConfig) -> Result<Self> {
        Ok(Self::with(Chain::connect(url, account, cfg).await?))
    }

    fn with(chain: Chain) -> Self {
        let hub = Arc::new(Hub::default());
        Self {
            chain,
            _closer: Arc::new(Closer::new(hub.clone())),
            hub,
        }
    }

    /// Whether the shared event scanner runs, as it changes: it starts with
    /// the first subscription and stops once every stream is dropped (or the
    /// adjudicator is).
    pub fn scanner_running(&self) -> watch::Receiver<bool> {
        self.hub.running.subscribe()
    }

    /// Every `Registered` and `Concluded` event of the adjudicator, whichever
    /// channel, in chain order from block `from_block` (not before the
    /// configured deployment block) on, at the confirmation depth: what a
    /// watchtower follows. One `eth_getLogs` per range of at most 2,000
    /// blocks; failures are retried for ever. See [`RegistrationFeed`].
    pub fn registrations(&self, from_block: u64) -> RegistrationFeed {
        self.registrations_in_ranges(from_block, feed::DEFAULT_RANGE)
    }

    /// [`registrations`](Self::registrations) with at most `range` blocks
    /// per `eth_getLogs` (for nodes that limit ranges more tightly).
    pub fn registrations_in_ranges(&self, from_block: u64, range: u64) -> RegistrationFeed {
        RegistrationFeed::eth(feed::EthFeed::new(self.chain.clone(), from_block, range))
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
        c.holder(holder)?;
        let input = Holder::withdrawCall {
            auth: crate::bindings::eth_holder::AssetHolder::WithdrawalAuth {
                channelId: auth.channelId,
                participant: auth.participant,
                receiver: auth.receiver,
                amount: auth.amount,
                nonce: auth.nonce,
            },
            sig: sig.clone(),
        }
        .abi_encode();
        let key = dedupe_key(
            "withdraw",
            &[
                holder.as_slice(),
                auth.channelId.as_slice(),
                auth.participant.as_slice(),
                auth.receiver.as_slice(),
                &auth.amount.to_be_bytes::<32>(),
                &auth.nonce.to_be_bytes::<32>(),
            ],
        );
        let landed = c
            .send(Call {
                op: "withdraw",
                to: holder,
                input: input.into(),
                value: U256::ZERO,
                key: Some(key),
            })
            .await?;
        debug!(tx = %landed.tx, "withdrawal mined");
        Ok(())
    }

    /// Pays `credit` of `account`'s credit in the channel at `holder` to
    /// `receiver`. The participant sending itself needs no signature (nor
    /// nonce); a signed authorisation carries the participant's current
    /// nonce and uses it up.
    pub(super) async fn pay_credit(
        &self,
        holder: Address,
        channel: ChannelId,
        credit: U256,
        account: &dyn perun_wallet::Account,
        receiver: Address,
    ) -> Result<()> {
        let c = &self.chain;
        let me = account.address();
        let mut auth = WithdrawalAuth {
            channelId: channel,
            participant: me,
            receiver,
            amount: credit,
            nonce: U256::ZERO,
        };
        let sig = if c.sender == me {
            Bytes::new()
        } else {
            auth.nonce = c.withdraw_nonce(holder, me).await?;
            let hash = withdrawal_hash(holder, c.chain_id, &auth);
            let sig = account.sign_hash(hash)?;
            Bytes::from(sig.as_bytes().to_vec())
        };
        self.withdraw_signed(holder, &auth, &sig).await
    }

    /// The shared chain handle (for the history reads in `eth/history.rs`).
    pub(super) fn chain(&self) -> &super::Chain {
        &self.chain
    }

    /// Sends `register`, `conclude` or `concludeFinal` for the channel and state.
    async fn send_adjudicator(
        &self,
        op: &'static str,
        id: ChannelId,
        state_hash: alloy::primitives::B256,
        input: Vec<u8>,
    ) -> Result<()> {
        let c = &self.chain;
        let landed = c
            .send(Call {
                op,
                to: c.cfg.adjudicator,
                input: input.into(),
                value: U256::ZERO,
                key: Some(dedupe_key(op, &[id.as_slice(), state_hash.as_slice()])),
            })
            .await?;
        debug!(op, tx = %landed.tx, gas = landed.gas_used, "mined");
        Ok(())
    }

    /// A conclusion that reverted lost a race with someone else's: report
    /// that as [`Error::AlreadyConcluded`] if the chain now says so.
    async fn already_concluded(&self, id: ChannelId, sent: Result<()>) -> Result<()> {
        match sent {
            Err(e @ (Error::Reverted { .. } | Error::NotRegistered | Error::WrongState)) => {
                match self.chain.dispute(id).await? {
                    Some(d) if d.concluded => Err(Error::AlreadyConcluded),
                    _ => Err(e),
                }
            }
            other => other,
        }
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
    fn domain(&self) -> Domain {
        self.chain.domain()
    }

    async fn register(&self, req: &SignedChannel) -> Result<()> {
        let state = &req.state.state;
        let span = info_span!("eth_register", channel = %state.channelId, version = state.version);
        async {
            let hash = req.check(self.chain.domain())?;
            let c = &self.chain;
            let id = state.channelId;
            let dispute = c.dispute(id).await?;
            if dispute.is_none() && !state.isFinal {
                // The contract's `now + challengeDuration` must fit in 64 bits.
                c.now()
                    .await?
                    .checked_add(req.params.challengeDuration)
                    .ok_or(Error::Overflow)?;
            }
            if let Some(d) = dispute {
                if !d.concluded && d.state_hash == hash {
                    debug!("state registered already; nothing to do");
                    return Ok(());
                }
                if d.concluded {
                    return Err(Error::AlreadyConcluded);
                }
                d.check_refutation(c.now().await?, state.version)?;
            }
            let input = AdjContract::registerCall {
                params: (&req.params).into(),
                state: state.into(),
                sigs: sigs_bytes(req),
            }
            .abi_encode();
            let sent = self.send_adjudicator("register", id, hash, input).await;
            match sent {
                Ok(()) => {
                    info!("registered");
                    Ok(())
                }
                Err(
                    e @ (Error::VersionTooLow { .. }
                    | Error::AlreadyConcluded
                    | Error::TimeoutPassed
                    | Error::Reverted { .. }),
                ) => {
                    // Another transaction came first: what is on-chain now decides.
                    match c.dispute(id).await? {
                        Some(d) if !d.concluded && d.state_hash == hash => {
                            info!("an identical registration came first; nothing to do");
                            Ok(())
                        }
                        Some(d) if d.concluded => Err(Error::AlreadyConcluded),
                        Some(d) if d.version >= state.version => Err(Error::VersionTooLow {
                            registered: d.version,
                            got: state.version,
                        }),
                        _ => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }

    async fn conclude(&self, req: &SignedChannel) -> Result<()> {
        let state = &req.state.state;
        let span = info_span!("eth_conclude", channel = %state.channelId, version = state.version);
        async {
            let c = &self.chain;
            let id = state.channelId;
            if state.isFinal && req.state.is_fully_signed() {
                let hash = req.check(c.domain())?;
                if let Some(d) = c.dispute(id).await? {
                    d.check_final(state.version)?;
                }
                let input = AdjContract::concludeFinalCall {
                    params: (&req.params).into(),
                    state: state.into(),
                    sigs: sigs_bytes(req),
                }
                .abi_encode();
                let sent = self
                    .send_adjudicator("concludeFinal", id, hash, input)
                    .await;
                self.already_concluded(id, sent).await?;
                info!("concluded final state");
                return Ok(());
            }
            req.check_unsigned(c.domain())?;
            let d = c.dispute(id).await?.ok_or(Error::NotRegistered)?;
            if d.concluded {
                return Err(Error::AlreadyConcluded);
            }
            let now = c.now().await?;
            let at = d.conclude_at(&req.params, state);
            if now < at {
                return Err(Error::TimeoutNotPassed { timeout: at, now });
            }
            let hash = state.hash();
            if hash != d.state_hash {
                warn!("conclude with a state that is not the registered one");
                return Err(Error::WrongState);
            }
            let input = AdjContract::concludeCall {
                params: (&req.params).into(),
                state: state.into(),
            }
            .abi_encode();
            let sent = self.send_adjudicator("conclude", id, hash, input).await;
            self.already_concluded(id, sent).await?;
            info!("concluded");
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn progress(&self, req: &ProgressRequest) -> Result<()> {
        let to = &req.to;
        let span = info_span!("eth_progress", channel = %to.channelId, version = to.version, actor = req.actor);
        async {
            let c = &self.chain;
            let hash = req.check(c.domain())?;
            let id = to.channelId;
            let dispute = c.dispute(id).await?;
            if req.done(dispute.as_ref(), hash) {
                debug!("state progressed to already; nothing to do");
                return Ok(());
            }
            let now = c.now().await?;
            req.check_dispute(dispute.as_ref(), now)?;
            // The contract's `now + challengeDuration` must fit in 64 bits.
            req.timeout(now)?;
            // The app's rule is checked by the queue's simulation of the call: a rejection
            // comes back as the app's revert, typed (`revert::app_rejected`), without gas.
            let input = AdjContract::progressCall {
                params: (&req.params).into(),
                from: (&req.from).into(),
                to: to.into(),
                actor: U256::from(req.actor),
                sig: Bytes::from(req.signature.as_bytes().to_vec()),
            }
            .abi_encode();
            let sent = self
                .send_adjudicator(super::revert::PROGRESS, id, hash, input)
                .await;
            match sent {
                Ok(()) => {
                    info!("progressed");
                    Ok(())
                }
                Err(
                    e @ (Error::WrongState
                    | Error::AlreadyConcluded
                    | Error::TimeoutPassed
                    | Error::Reverted { .. }),
                ) => {
                    // Another transaction came first: what is on-chain now decides.
                    match c.dispute(id).await? {
                        Some(d) if !d.concluded && d.state_hash == hash => {
                            info!("an identical progression came first; nothing to do");
                            Ok(())
                        }
                        Some(d) if d.concluded => Err(Error::AlreadyConcluded),
                        _ => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }

    async fn withdraw(&self, req: &WithdrawRequest) -> Result<()> {
        let span = info_span!("eth_withdraw", channel = %req.state.channelId, index = req.index);
        async {
            let c = &self.chain;
            let me = req.check(c.domain())?;
            let mut credits = Vec::new();
            for (_, holder) in c.local_assets(&req.state) {
                let (credit, settled) = c
                    .holdings(holder, req.state.channelId, me, BlockId::latest())
                    .await?;
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
                self.pay_credit(
                    holder,
                    req.state.channelId,
                    credit,
                    &*req.account,
                    req.receiver,
                )
                .await?;
                info!(%holder, %credit, "withdrawn");
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Joins the adjudicator's one event scanner (started here if it is not
    /// running): the channel's past events come first, then live ones. The
    /// stream lives until it is dropped or the adjudicator is; node failures
    /// on the way are the scanner's to ride out.
    async fn subscribe(&self, id: ChannelId) -> Result<EventStream> {
        let (tx, rx) = event_channel(Some(self.hub.streams.clone()));
        if let Some(generation) = self.hub.join(id, tx) {
            scan::spawn(self.chain.clone(), self.hub.clone(), generation);
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

    fn history(&self) -> Option<&dyn crate::ChainHistory> {
        Some(self)
    }
}
