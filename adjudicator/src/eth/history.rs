//! [`ChainHistory`] for [`EthAdjudicator`]: one `eth_getLogs` per range
//! asked for (the adjudicator and the configured holders, their six channel
//! events, no channel filter: a holder's `Deposited` and `Paid` do not index
//! the participant, so the caller filters), checked against the hash of the
//! range's last block before and after the read; `holdings` and `withdraw`
//! at the latest block.

use std::sync::Arc;

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::Log;
use alloy::sol_types::SolEvent;
use async_trait::async_trait;
use perun_channel::ChannelId;
use perun_wallet::Account;
use tracing::{debug, info, warn};

use super::{AdjContract, EthAdjudicator, EthConfig, Holder};
use crate::history::{ChainFact, ChainHistory, ChainLog, LogPage};
use crate::{BadEventReason, Error, Result, RpcFailure};

#[async_trait]
impl ChainHistory for EthAdjudicator {
    fn first_block(&self) -> u64 {
        self.chain().cfg.from_block
    }

    async fn confirmed_block(&self) -> Result<u64> {
        let c = self.chain();
        Ok(c.head().await?.saturating_sub(c.cfg.depth()))
    }

    async fn logs(&self, from: u64, to: u64) -> Result<LogPage> {
        let c = self.chain();
        let unstable = || {
            Error::rpc(
                "eth_getLogs",
                RpcFailure::Missing("a stable chain during the read (a reorg)"),
            )
        };
        let Some((_, tip, _)) = c.block(BlockNumberOrTag::Number(to)).await? else {
            return Err(unstable());
        };
        let filter = super::deployment_filter(
            &c.cfg,
            vec![
                AdjContract::Registered::SIGNATURE_HASH,
                AdjContract::Concluded::SIGNATURE_HASH,
                Holder::Deposited::SIGNATURE_HASH,
                Holder::Paid::SIGNATURE_HASH,
                Holder::Credited::SIGNATURE_HASH,
                Holder::Withdrawn::SIGNATURE_HASH,
            ],
        )
        .from_block(from)
        .to_block(to);
        let raw = c
            .conn
            .rpc("eth_getLogs", |p| async move { p.get_logs(&filter).await })
            .await?;
        let now = c.block(BlockNumberOrTag::Number(to)).await?;
        if now.map(|(n, h, _)| (n, h)) != Some((to, tip)) {
            warn!(block = to, "reorg during the history read");
            return Err(unstable());
        }
        let mut page = LogPage::default();
        for l in &raw {
            match history_log(&c.cfg, l, from, to, tip) {
                Ok(log) => page.logs.push(log),
                Err(e) => {
                    warn!(%e, "refusing a history log");
                    page.rejected.push(e);
                }
            }
        }
        debug!(
            from,
            to,
            logs = page.logs.len(),
            rejected = page.rejected.len(),
            "history read"
        );
        Ok(page)
    }

    async fn credit(
        &self,
        holder: Address,
        channel: ChannelId,
        participant: Address,
    ) -> Result<(U256, bool)> {
        self.chain()
            .holdings(holder, channel, participant, BlockId::latest())
            .await
    }

    async fn withdraw_credit(
        &self,
        holder: Address,
        channel: ChannelId,
        account: Arc<dyn Account>,
    ) -> Result<U256> {
        let me = account.address();
        let (credit, settled) = self.credit(holder, channel, me).await?;
        if !settled {
            return Err(Error::NotConcluded);
        }
        if credit.is_zero() {
            debug!(%holder, %channel, "nothing credited");
            return Ok(U256::ZERO);
        }
        self.pay_credit(holder, channel, credit, &*account, me)
            .await?;
        info!(%holder, %channel, %credit, "credit withdrawn");
        Ok(credit)
    }
}

/// A log of the range `from..=to` of the chain ending in `tip` at `to`,
/// decoded; anything else is an error naming what is wrong with it.
fn history_log(cfg: &EthConfig, l: &Log, from: u64, to: u64, tip: B256) -> Result<ChainLog> {
    let address = l.address();
    let topic = l.topic0().copied().unwrap_or_default();
    let bad = |reason| Error::BadEvent {
        address,
        topic,
        reason,
    };
    let block = l.block_number;
    let placed = match (block, l.log_index) {
        (Some(b), Some(i)) if !l.removed && (from..=to).contains(&b) => {
            (b != to || l.block_hash == Some(tip)).then_some((b, i))
        }
        _ => None,
    };
    let Some((block, log_index)) = placed else {
        return Err(bad(BadEventReason::NotInRange { from, to, block }));
    };
    let decode = |e: alloy::sol_types::Error| bad(BadEventReason::Decode(e.to_string()));
    let (channel, fact) = if address == cfg.adjudicator {
        if topic == AdjContract::Registered::SIGNATURE_HASH {
            let e = AdjContract::Registered::decode_log(&l.inner)
                .map_err(decode)?
                .data;
            if e.state.channelId != e.channelId {
                return Err(bad(BadEventReason::OtherChannel(e.state.channelId)));
            }
            let fact = ChainFact::Registered {
                version: e.version,
                timeout: e.timeout,
            };
            (e.channelId, fact)
        } else if topic == AdjContract::Concluded::SIGNATURE_HASH {
            let e = AdjContract::Concluded::decode_log(&l.inner)
                .map_err(decode)?
                .data;
            (e.channelId, ChainFact::Concluded { version: e.version })
        } else {
            return Err(bad(BadEventReason::Unexpected));
        }
    } else if cfg.assets.contains_key(&address) {
        let holder = address;
        if topic == Holder::Deposited::SIGNATURE_HASH {
            let e = Holder::Deposited::decode_log(&l.inner)
                .map_err(decode)?
                .data;
            let fact = ChainFact::Deposited {
                holder,
                participant: e.participant,
                amount: e.amount,
            };
            (e.channelId, fact)
        } else if topic == Holder::Paid::SIGNATURE_HASH {
            let e = Holder::Paid::decode_log(&l.inner).map_err(decode)?.data;
            let fact = ChainFact::Paid {
                holder,
                participant: e.participant,
                amount: e.amount,
            };
            (e.channelId, fact)
        } else if topic == Holder::Credited::SIGNATURE_HASH {
            let e = Holder::Credited::decode_log(&l.inner).map_err(decode)?.data;
            let fact = ChainFact::Credited {
                holder,
                participant: e.participant,
                amount: e.amount,
            };
            (e.channelId, fact)
        } else if topic == Holder::Withdrawn::SIGNATURE_HASH {
            let e = Holder::Withdrawn::decode_log(&l.inner)
                .map_err(decode)?
                .data;
            let fact = ChainFact::Withdrawn {
                holder,
                participant: e.participant,
                receiver: e.receiver,
                amount: e.amount,
            };
            (e.channelId, fact)
        } else {
            return Err(bad(BadEventReason::Unexpected));
        }
    } else {
        return Err(bad(BadEventReason::Unexpected));
    };
    Ok(ChainLog {
        block,
        log_index,
        channel,
        fact,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use alloy::primitives::{Bytes, LogData};

    use super::*;
    use crate::AssetKind;

    const ADJ: Address = Address::repeat_byte(0xad);
    const HOLDER: Address = Address::repeat_byte(0xee);

    fn cfg() -> EthConfig {
        EthConfig::new(ADJ, 0, [(HOLDER, AssetKind::Eth)])
    }

    fn log(address: Address, data: LogData, block: u64, hash: B256) -> Log {
        Log {
            inner: alloy::primitives::Log { address, data },
            block_hash: Some(hash),
            block_number: Some(block),
            block_timestamp: None,
            transaction_hash: None,
            transaction_index: None,
            log_index: Some(3),
            removed: false,
        }
    }

    fn deposited() -> LogData {
        Holder::Deposited {
            channelId: B256::repeat_byte(1),
            participant: Address::repeat_byte(2),
            amount: U256::from(5),
        }
        .encode_log_data()
    }

    fn reason(r: Result<ChainLog>) -> BadEventReason {
        match r {
            Err(Error::BadEvent { reason, .. }) => reason,
            other => panic!("expected a bad event, got {other:?}"),
        }
    }

    #[test]
    fn logs_are_decoded_and_bad_ones_refused_with_a_reason() {
        let tip = B256::repeat_byte(9);
        let ok = history_log(&cfg(), &log(HOLDER, deposited(), 10, tip), 1, 10, tip).unwrap();
        assert_eq!((ok.block, ok.log_index), (10, 3));
        assert_eq!(ok.channel, B256::repeat_byte(1));
        assert_eq!(ok.fact.participant(), Some(Address::repeat_byte(2)));

        // Outside the range, of another chain at its last block, or removed.
        let out = log(HOLDER, deposited(), 11, tip);
        assert!(matches!(
            reason(history_log(&cfg(), &out, 1, 10, tip)),
            BadEventReason::NotInRange {
                block: Some(11),
                ..
            }
        ));
        let forked = log(HOLDER, deposited(), 10, B256::repeat_byte(8));
        assert!(matches!(
            reason(history_log(&cfg(), &forked, 1, 10, tip)),
            BadEventReason::NotInRange { .. }
        ));
        let mut removed = log(HOLDER, deposited(), 5, tip);
        removed.removed = true;
        assert!(matches!(
            reason(history_log(&cfg(), &removed, 1, 10, tip)),
            BadEventReason::NotInRange { .. }
        ));
        // Data that does not decode as the event, and a contract not ours.
        let topics = deposited().topics().to_vec();
        let garbage = LogData::new_unchecked(topics, Bytes::from_static(&[1, 2, 3]));
        assert!(matches!(
            reason(history_log(
                &cfg(),
                &log(HOLDER, garbage, 5, tip),
                1,
                10,
                tip
            )),
            BadEventReason::Decode(_)
        ));
        let stranger = log(Address::repeat_byte(0x99), deposited(), 5, tip);
        assert!(matches!(
            reason(history_log(&cfg(), &stranger, 1, 10, tip)),
            BadEventReason::Unexpected
        ));
        // A holder event at the adjudicator's address is not one of its events.
        let misplaced = log(ADJ, deposited(), 5, tip);
        assert!(matches!(
            reason(history_log(&cfg(), &misplaced, 1, 10, tip)),
            BadEventReason::Unexpected
        ));
    }
}
