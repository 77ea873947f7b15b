//! Validity of params and states, and the transition rule (DESIGN §3).

use std::collections::BTreeSet;

use alloy_primitives::{Address, U256};

use crate::limits::*;
use crate::{App, Error, Params, Result, State};

/// The payment rule: only the actor's balances may decrease and `appData`
/// stays empty.
pub(crate) fn check_payment(cur: &State, next: &State, actor: usize) -> Result<()> {
    if !next.appData.is_empty() {
        return Err(Error::PaymentAppData);
    }
    for (asset, (old, new)) in cur
        .outcome
        .balances
        .iter()
        .zip(&next.outcome.balances)
        .enumerate()
    {
        for (participant, (o, n)) in old.iter().zip(new).enumerate() {
            if participant != actor && n < o {
                return Err(Error::TakesOthersFunds {
                    actor,
                    participant,
                    asset,
                });
            }
        }
    }
    Ok(())
}

impl Params {
    /// Checks the limits and well-formedness of the params.
    pub fn validate(&self) -> Result<()> {
        let n = self.participants.len();
        if !(MIN_PARTICIPANTS..=MAX_PARTICIPANTS).contains(&n) {
            return Err(Error::Participants(n));
        }
        let mut seen = BTreeSet::new();
        for p in &self.participants {
            if *p == Address::ZERO || !seen.insert(*p) {
                return Err(Error::BadParticipant(*p));
            }
        }
        if !(MIN_CHALLENGE_DURATION..=MAX_CHALLENGE_DURATION).contains(&self.challengeDuration) {
            return Err(Error::ChallengeDuration(self.challengeDuration));
        }
        let rows = self.funding.len();
        if !(MIN_ASSETS..=MAX_ASSETS).contains(&rows) || self.funding.iter().any(|r| r.len() != n) {
            return Err(Error::FundingDimensions {
                assets: rows,
                participants: n,
            });
        }
        Ok(())
    }
}

impl State {
    /// Checks only the size limits: cheap, and safe to run on untrusted input
    /// before anything else looks at it.
    pub fn check_limits(&self) -> Result<()> {
        let assets = self.outcome.assets.len();
        if !(MIN_ASSETS..=MAX_ASSETS).contains(&assets) {
            return Err(Error::Assets(assets));
        }
        if self.appData.len() > MAX_APP_DATA {
            return Err(Error::AppDataTooLarge(self.appData.len()));
        }
        if self.outcome.balances.len() != assets
            || self
                .outcome
                .balances
                .iter()
                .any(|row| row.len() > MAX_PARTICIPANTS)
        {
            return Err(Error::Dimensions {
                assets,
                participants: self.outcome.balances.first().map_or(0, Vec::len),
            });
        }
        Ok(())
    }

    /// A valid state of the channel `params` describes: limits, dimensions,
    /// channel id, no overflowing sums, and no app data in payment channels.
    pub fn validate(&self, params: &Params) -> Result<()> {
        params.validate()?;
        self.validate_for(params, params.channel_id())
    }

    /// [`validate`](Self::validate) for `params` already known valid, whose
    /// channel id is `id`: skips re-checking the params and re-hashing them
    /// (the update path checks every state against the same params).
    pub fn validate_for(&self, params: &Params, id: crate::ChannelId) -> Result<()> {
        self.check_limits()?;
        let participants = params.participants.len();
        let assets = self.outcome.assets.len();
        if self
            .outcome
            .balances
            .iter()
            .any(|row| row.len() != participants)
        {
            return Err(Error::Dimensions {
                assets,
                participants,
            });
        }
        if params.funding.len() != assets {
            return Err(Error::FundingDimensions {
                assets,
                participants,
            });
        }
        if self.channelId != id {
            return Err(Error::ChannelIdMismatch {
                expected: id,
                got: self.channelId,
            });
        }
        if params.is_payment() && !self.appData.is_empty() {
            return Err(Error::PaymentAppData);
        }
        for (i, a) in self.outcome.assets.iter().enumerate() {
            if self.outcome.assets[..i].contains(a) {
                return Err(Error::DuplicateAsset(i));
            }
        }
        for i in 0..assets {
            self.asset_sum(i)?;
        }
        Ok(())
    }

    /// Sum of all balances of asset `i`.
    pub fn asset_sum(&self, i: usize) -> Result<U256> {
        let row = self.outcome.balances.get(i).ok_or(Error::Index(i))?;
        row.iter()
            .try_fold(U256::ZERO, |acc, b| acc.checked_add(*b))
            .ok_or(Error::Overflow(i))
    }

    /// Checks that `actor` may move the channel from `self` to `next`
    /// (DESIGN §3): same channel, not final, a newer version (at most
    /// `MAX_VERSION_STEP` ahead), same assets, same
    /// per-asset sums, and the application's (or payment) rule.
    pub fn validate_transition(
        &self,
        params: &Params,
        next: &State,
        actor: usize,
        app: &dyn App,
    ) -> Result<()> {
        params.validate()?;
        self.validate_transition_for(params, params.channel_id(), next, actor, app)
    }

    /// [`validate_transition`](Self::validate_transition) for `params`
    /// already known valid, whose channel id is `id` (a machine checks
    /// every update against the same params).
    pub(crate) fn validate_transition_for(
        &self,
        params: &Params,
        id: crate::ChannelId,
        next: &State,
        actor: usize,
        app: &dyn App,
    ) -> Result<()> {
        next.validate_for(params, id)?;
        if actor >= params.participants.len() {
            return Err(Error::Index(actor));
        }
        if next.channelId != self.channelId {
            return Err(Error::ChannelIdMismatch {
                expected: self.channelId,
                got: next.channelId,
            });
        }
        if self.isFinal {
            return Err(Error::Final);
        }
        // Any newer version up to `MAX_VERSION_STEP` ahead: a failed update
        // may have burnt the versions in between (see `limits`).
        let expected = self.version.checked_add(1).ok_or(Error::Version {
            expected: u64::MAX,
            got: next.version,
        })?;
        if next.version < expected || next.version - self.version > crate::limits::MAX_VERSION_STEP
        {
            return Err(Error::Version {
                expected,
                got: next.version,
            });
        }
        if next.outcome.assets != self.outcome.assets {
            return Err(Error::AssetsChanged);
        }
        for i in 0..self.outcome.assets.len() {
            if self.asset_sum(i)? != next.asset_sum(i)? {
                return Err(Error::SumChanged(i));
            }
        }
        if params.is_payment() {
            check_payment(self, next, actor)
        } else {
            app.valid_transition(params, self, next, actor)
                .map_err(|reason| {
                    tracing::debug!(%reason, actor, version = next.version, "app refused a transition");
                    Error::App(reason)
                })
        }
    }
}
