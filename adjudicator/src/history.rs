//! [`ChainHistory`]: a deployment's channel logs by block range, and the
//! holders' credits, for a party that lost (or never had) the list of its
//! channels.
//!
//! A channel's [`EventStream`](crate::EventStream) serves a party that knows
//! the channel; the [`RegistrationFeed`](crate::RegistrationFeed) follows
//! every dispute for a watchtower. History answers the third question: which
//! channels did this account take part in, and what does the chain still owe
//! it? The client's chain index scans it in bounded ranges from a cursor it
//! keeps in its store (`perun_client::recover`).
//!
//! Reached through [`Adjudicator::history`](crate::Adjudicator::history);
//! [`EthAdjudicator`](crate::EthAdjudicator) and [`SimLedger`](crate::SimLedger)
//! have it.

use std::sync::Arc;

use alloy_primitives::{Address, U256};
use async_trait::async_trait;
use perun_channel::ChannelId;
use perun_wallet::Account;

use crate::{Error, Result};

/// One log of the deployment about a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLog {
    /// The block it was mined in (on [`SimLedger`](crate::SimLedger): the
    /// ledger's log count after it; every log is a block of its own).
    pub block: u64,
    /// Its index in the block: `(block, log_index)` is its position.
    pub log_index: u64,
    /// The channel it is about.
    pub channel: ChannelId,
    /// What it says.
    pub fact: ChainFact,
}

/// What a channel log says (the contracts' events, decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFact {
    /// A holder's `Deposited`.
    Deposited {
        /// The holder.
        holder: Address,
        /// Whom the deposit is for.
        participant: Address,
        /// What arrived.
        amount: U256,
    },
    /// The adjudicator's `Registered` (its state left out).
    Registered {
        /// The registered version.
        version: u64,
        /// When its challenge ends.
        timeout: u64,
    },
    /// The adjudicator's `Concluded`.
    Concluded {
        /// The concluded version.
        version: u64,
    },
    /// A holder's `Paid`: the outcome was pushed to the participant.
    Paid {
        /// The holder.
        holder: Address,
        /// The participant paid.
        participant: Address,
        /// How much.
        amount: U256,
    },
    /// A holder's `Credited`: the push failed, the amount waits for `withdraw`.
    Credited {
        /// The holder.
        holder: Address,
        /// The participant credited.
        participant: Address,
        /// How much.
        amount: U256,
    },
    /// A holder's `Withdrawn`.
    Withdrawn {
        /// The holder.
        holder: Address,
        /// Whose credit.
        participant: Address,
        /// Who got it.
        receiver: Address,
        /// How much.
        amount: U256,
    },
}

impl ChainFact {
    /// The participant a holder's log names (`None` for the adjudicator's).
    pub fn participant(&self) -> Option<Address> {
        match self {
            ChainFact::Deposited { participant, .. }
            | ChainFact::Paid { participant, .. }
            | ChainFact::Credited { participant, .. }
            | ChainFact::Withdrawn { participant, .. } => Some(*participant),
            ChainFact::Registered { .. } | ChainFact::Concluded { .. } => None,
        }
    }
}

/// The logs of one range: what decoded, in chain order, and what did not.
#[derive(Debug, Default)]
pub struct LogPage {
    /// The channel logs, in chain order.
    pub logs: Vec<ChainLog>,
    /// Logs of the deployment's contracts that were refused (do not decode,
    /// lie outside the range, are marked removed): each was logged with
    /// `warn!` and is left out of `logs`.
    pub rejected: Vec<Error>,
}

/// A deployment's history, read by block range.
///
/// # Contract
/// - **Bounded reads.** [`logs`](Self::logs) reads exactly the blocks asked
///   for, in one query; the caller bounds the range (a node refuses or
///   times out on large ones: a failed read is
///   [`Error::is_transient`](crate::Error::is_transient), retry a smaller range).
/// - **One chain per answer.** The logs of one call belong to one chain: the
///   backend checks that the range's last block did not change during the
///   read, and fails transiently if it did.
/// - **Confirmed only.** A caller reads up to [`confirmed_block`](Self::confirmed_block)
///   (the head less the backend's confirmation depth). A reorg deeper than
///   that is the caller's to survive: it reads the last blocks again.
/// - **Untrusted logs.** A log that does not decode is refused in
///   [`LogPage::rejected`], never a panic; logs are hints, the credit read
///   ([`credit`](Self::credit)) is the truth about money.
/// - **Idempotent payout.** [`withdraw_credit`](Self::withdraw_credit) pays
///   what is credited now and nothing when nothing is.
#[async_trait]
pub trait ChainHistory: Send + Sync {
    /// The first block with logs of the deployment (its deployment block).
    fn first_block(&self) -> u64;

    /// The newest block at the backend's confirmation depth.
    async fn confirmed_block(&self) -> Result<u64>;

    /// The channel logs of the adjudicator and the configured holders in
    /// blocks `from..=to`.
    async fn logs(&self, from: u64, to: u64) -> Result<LogPage>;

    /// What `holder` holds for `participant` in the channel now, and whether
    /// the channel is concluded (then it is the participant's withdrawable
    /// credit): the holders' `holdings`.
    async fn credit(
        &self,
        holder: Address,
        channel: ChannelId,
        participant: Address,
    ) -> Result<(U256, bool)>;

    /// Withdraws `account`'s whole credit in the channel at `holder` to the
    /// account, without the channel's params or state; returns what was
    /// paid (zero, and no transaction, if nothing is credited).
    /// [`Error::NotConcluded`] if the channel is not concluded.
    async fn withdraw_credit(
        &self,
        holder: Address,
        channel: ChannelId,
        account: Arc<dyn Account>,
    ) -> Result<U256>;
}
